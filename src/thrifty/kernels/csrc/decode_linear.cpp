// Linear layers at decoding batch sizes (a few dozen rows) in bf16 on the AMX tile
// unit, or on the vector units (AVX-512 BF16) where there is no AMX, with the bias and
// the LoRA branch fused in.
//
// A decoding step reads every weight of the model from memory for a handful of rows,
// so its matmuls are bound by how fast they stream their weights. oneDNN's pre-packed
// matmul streamed cold weights at 8-11 GB/s here (32 rows) where a plain read gets 20.
// Here the weight is packed in blocks of 32 output columns, each block contiguous in the
// layout the tiles read, and each thread takes a contiguous range of blocks: one
// sequential stream per core. The tile instructions are issued directly: through
// oneDNN's brgemm (ATen's cpublas), each 32 x 32 block paid a kernel-cache lookup and
// a tile reconfiguration, about as long as its arithmetic.
//
// A LoRA branch, scaling * B (A x), runs on the tiles too, accumulated into the same
// float block as the base product, and the bias is added before the one rounding to
// bf16. To keep the branch as accurate as float while the tiles multiply bf16, every
// float operand is split into a bf16 "hi" part and a bf16 "lo" part (v = hi + lo to
// ~16 mantissa bits): x A^T = x A_hi^T + x A_lo^T (x is bf16 already), and
// (x A^T) B^T = xa_hi B_hi^T + xa_hi B_lo^T + xa_lo B_hi^T. On the vector units in
// float (this CPU has one 512-bit FMA port), the branch had cost 1-1.5x the block's
// whole matmul; here it is three extra input rows per rank.
//
// Without AMX (AMD Zen 4 and 5, Intel Cooper Lake) the same packed blocks go through
// vnni_gemm.h's vdpbf16ps kernel (VectorBlock below). There the generation steps had
// gone through the modules and oneDNN: this kernel is what lets decoding_step.cpp run
// the whole step natively.
#include "native.h"

#if THRIFTY_NATIVE_AVX512
#include <ATen/Parallel.h>

#include "vnni_gemm.h"
#if THRIFTY_NATIVE_AMX
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <vector>

namespace {

using at::BFloat16;

constexpr int64_t kColumns = 32;  // output columns per packed block (best of 32-256 measured)
constexpr int64_t kRows = 32;     // input rows per pass: 2 x 2 float tiles of 16 x 16
constexpr int64_t kDepth = 32;    // input columns per tile step (a tile row holds 32 bf16)

int64_t round_up(int64_t n, int64_t step) { return (n + step - 1) / step * step; }

#if THRIFTY_NATIVE_AMX
// How far ahead of the tile loads the weight stream is prefetched. The tile loads
// alone streamed the weights at ~7.8 GB/s; prefetched 2-16 KB ahead, at 10.5-12 GB/s
// (a plain read gets 11-14 here): the whole model's projections at 32 rows with LoRA
// 35 -> 23 ms. Past a block's end it runs into the next block, the one read next.
constexpr int64_t kPrefetchBytes = 4096;

// Linux hands out the tile registers' state only to processes that ask for it.
bool tiles_permitted() {
  constexpr int kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  static const bool permitted = syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  return permitted;
}

// Tiles 0-3: the float accumulators of a 32 x 32 output block (rows 0-15 / 16-31 x
// columns 0-15 / 16-31); 4-5: two 16-row slices of the input; 6-7: two 16-column
// slices of the weight block. All are 16 rows of 64 bytes. Configured for a scope.
class TileScope {
 public:
  TileScope() {
    struct alignas(64) {
      uint8_t palette = 1, start_row = 0, reserved[14] = {};
      uint16_t bytes_per_row[16] = {};
      uint8_t rows[16] = {};
    } config;
    for (int t = 0; t < 8; ++t) {
      config.bytes_per_row[t] = 64;
      config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// The accumulators += x [32 rows, depth] (row stride `x_stride`) times a packed block
// [depth / 2, 32, 2]: pairs of input rows interleaved, as the bf16 dot-product tiles read.
inline void accumulate(const BFloat16* x, int64_t x_stride, const BFloat16* block, int64_t depth) {
  const int64_t x_bytes = x_stride * static_cast<int64_t>(sizeof(BFloat16));
  for (int64_t k = 0; k < depth; k += kDepth) {
    _tile_loadd(4, x + k, x_bytes);
    _tile_loadd(5, x + 16 * x_stride + k, x_bytes);
    const BFloat16* rows = block + k * kColumns;  // input rows [k, k + 32): 16 interleaved pairs
    prefetch(reinterpret_cast<const char*>(rows) + kPrefetchBytes, kDepth * kColumns * sizeof(BFloat16));
    _tile_loadd(6, rows, kColumns * 2 * sizeof(BFloat16));
    _tile_loadd(7, rows + 32, kColumns * 2 * sizeof(BFloat16));
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

inline void zero_accumulators() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

inline void store_accumulators(float* acc) {  // acc: [32, 32] float
  constexpr int64_t stride = kColumns * sizeof(float);
  _tile_stored(0, acc, stride);
  _tile_stored(1, acc + 16, stride);
  _tile_stored(2, acc + 16 * kColumns, stride);
  _tile_stored(3, acc + 16 * kColumns + 16, stride);
}

// A [32, 32] float output block (`acc`, row pitch 32) summed on the tile unit: add
// products, then finish writes it. Always 32 rows: the inputs are padded with zero rows.
class TileBlock {
 public:
  using Scope = TileScope;  // held by each thread around its blocks
  explicit TileBlock(float* acc) : acc_(acc) { zero_accumulators(); }
  void add(const BFloat16* x, int64_t x_stride, int64_t /*rows*/, const BFloat16* block, int64_t depth,
           const BFloat16* /*next: accumulate prefetches its own stream*/ = nullptr) {
    accumulate(x, x_stride, block, depth);
  }
  void finish() { store_accumulators(acc_); }

 private:
  float* acc_;
};
#endif

// The same block summed on the vector units, straight into `acc`, for its first `rows` rows.
class VectorBlock {
 public:
  struct Scope {};
  explicit VectorBlock(float* acc) : acc_(acc) {}
  // next: the block read after this one (its weights stream in meanwhile), or null.
  void add(const BFloat16* x, int64_t x_stride, int64_t rows, const BFloat16* block, int64_t depth,
           const BFloat16* next = nullptr) {
    vnni_gemm::avx512_gemm(rows, kColumns, depth, x_stride, kColumns, kColumns, !empty_, x, block, acc_, next);
    empty_ = false;
  }
  void finish() {}  // acc holds the sums already (the first add wrote them)

 private:
  float* acc_;
  bool empty_ = true;
};

// x [rows, K] copied into a zeroed [round_up(rows, 32), depth] buffer, so every tile is whole.
std::vector<BFloat16> padded_rows(const BFloat16* x, int64_t rows, int64_t K, int64_t depth) {
  std::vector<BFloat16> out(round_up(rows, kRows) * depth, BFloat16(0.f));
  for (int64_t m = 0; m < rows; ++m) std::copy(x + m * K, x + (m + 1) * K, out.data() + m * depth);
  return out;
}

// The LoRA operands as decode_lora_pack returns them: {down, up, segments, blocks}.
//   down: the blocks of [A_hi; A_lo] ([2 R, K], R the group's total rank).
//   segments [adapters, 3]: (first rank, rank, first row) per adapter. Adapter j's rows of
//     the up-projection's input are [xa_hi_j, xa_hi_j, xa_lo_j], padded to whole tile
//     steps, against its B's [hi; lo; hi].
//   blocks [column blocks, 3]: (offset in up, first row, depth) per block of 32 output
//     columns: a block is packed over the segments of the adapters its columns belong
//     to, usually one. Packed over every adapter's segment, as one block-diagonal B, the
//     q/k/v blocks streamed 160 rows where 48 are non-zero, the gate/up blocks 96: 30
//     layers' q/k/v at 16 rows took 3.3-4.0 ms, now 2.8-3.4; gate/up 10.8-12.0, now
//     10.4-11.5 (same process, interleaved).
struct Lora {
  const BFloat16 *down, *up;
  const int64_t *segments, *blocks;
  int64_t adapters, rank, width;  // width: rows of the up-projection's input
};

Lora lora_operands(const std::vector<at::Tensor>& lora, int64_t depth, int64_t column_blocks) {
  TORCH_CHECK(lora.size() == 4, "decode_linear: LoRA operands must be the 4 tensors of decode_lora_pack");
  const at::Tensor &down = lora[0], &up = lora[1], &segments = lora[2], &blocks = lora[3];
  TORCH_CHECK(segments.dim() == 2 && segments.size(1) == 3 && segments.scalar_type() == at::kLong &&
                  blocks.dim() == 2 && blocks.size(0) == column_blocks && blocks.size(1) == 3 &&
                  blocks.scalar_type() == at::kLong && down.size(1) * 2 == depth,
              "decode_linear: LoRA weights must come from decode_lora_pack for this layer");
  const int64_t adapters = segments.size(0);
  const int64_t* s = segments.data_ptr<int64_t>();
  const int64_t rank = s[3 * (adapters - 1)] + s[3 * (adapters - 1) + 1];
  TORCH_CHECK(down.size(0) * kColumns >= 2 * rank, "decode_linear: LoRA down-projection does not fit its ranks");
  return {down.data_ptr<BFloat16>(), up.data_ptr<BFloat16>(), s, blocks.data_ptr<int64_t>(), adapters, rank,
          s[3 * (adapters - 1) + 2] + round_up(3 * s[3 * (adapters - 1) + 1], kDepth)};
}

// The up-projection's input [round_up(rows, 32), lora.width] in bf16 from x (padded):
// x A^T against the down-projection, laid out in the adapters' segments.
template <class Block>
std::vector<BFloat16> lora_hidden(const std::vector<BFloat16>& x, int64_t M, int64_t depth, const Lora& lora) {
  const int64_t padded_rows = x.size() / depth, rank = lora.rank;
  const int64_t sums_stride = round_up(2 * rank, kColumns);
  std::vector<BFloat16> xa(padded_rows * lora.width, BFloat16(0.f));
  std::vector<float> sums(kRows * sums_stride);
  typename Block::Scope scope;
  for (int64_t m0 = 0; m0 < padded_rows; m0 += kRows) {
    float acc[kRows * kColumns];
    for (int64_t c0 = 0; c0 < 2 * rank; c0 += kColumns) {
      Block block(acc);
      block.add(x.data() + m0 * depth, depth, std::min(kRows, M - m0), lora.down + c0 * depth, depth);
      block.finish();
      for (int64_t m = 0; m < kRows; ++m) {
        std::copy(acc + m * kColumns, acc + (m + 1) * kColumns, sums.data() + m * sums_stride + c0);
      }
    }
    for (int64_t m = 0; m < kRows; ++m) {
      const float* hidden = sums.data() + m * sums_stride;  // [x A_hi^T, x A_lo^T]
      for (int64_t j = 0; j < lora.adapters; ++j) {
        const int64_t first = lora.segments[3 * j], r_j = lora.segments[3 * j + 1];
        BFloat16* row = xa.data() + (m0 + m) * lora.width + lora.segments[3 * j + 2];
        for (int64_t r = 0; r < r_j; r += 16) {
          const int count = static_cast<int>(std::min<int64_t>(16, r_j - r));
          const __m512 value =
              _mm512_add_ps(load16(hidden + first + r, count), load16(hidden + rank + first + r, count));
          const __m512 hi = round_bf16(value);
          store16(row + r, hi, count);
          store16(row + r_j + r, hi, count);
          store16(row + 2 * r_j + r, _mm512_sub_ps(value, hi), count);
        }
      }
    }
  }
  return xa;
}

// acc [rows, 32] float plus the bias, rounded once to bf16 into columns [n0, n0 + columns) of out.
void block_epilogue(const float* acc, int64_t rows, int64_t n0, int64_t columns, int64_t N,
                    const BFloat16* bias, BFloat16* out) {
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t j = 0; j < columns; j += 16) {
      const int count = static_cast<int>(std::min<int64_t>(16, columns - j));
      __m512 value = load16(acc + m * kColumns + j);
      if (bias != nullptr) value = _mm512_add_ps(value, load16(bias + n0 + j, count));
      store16(out + m * N + n0 + j, value, count);
    }
  }
}

// A row-major [N, K] bf16 matrix X as blocks of 32 output columns: block b holds
// X^T's columns [32 b, 32 b + 32) as [depth / 2, 32, 2], depth = K rounded up to 32;
// zero past N and K.
at::Tensor pack_blocks(const at::Tensor& matrix) {
  const int64_t N = matrix.size(0), K = matrix.size(1), depth = round_up(K, kDepth);
  const auto padded = at::constant_pad_nd(matrix.to(at::kBFloat16), {0, depth - K}).contiguous();
  const int64_t blocks = (N + kColumns - 1) / kColumns;
  auto packed = at::empty({blocks, depth / 2, kColumns, 2}, padded.options());
  const BFloat16* src = padded.data_ptr<BFloat16>();
  BFloat16* dst = packed.data_ptr<BFloat16>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      pack_vnni_transposed(src + b * kColumns * depth, depth, N - b * kColumns, depth, kColumns,
                           dst + b * depth * kColumns);
    }
  });
  return packed;
}

// v = hi + lo, both bf16 (round to nearest even).
std::pair<at::Tensor, at::Tensor> split_hi_lo(const at::Tensor& v) {
  const auto hi = v.to(at::kBFloat16);
  return {hi, (v - hi.to(at::kFloat)).to(at::kBFloat16)};
}

// decode_linear's product on the tile unit or the vector units (Block).
template <class Block>
at::Tensor decode_blocks(const at::Tensor& x, const at::Tensor& packed, int64_t N, const BFloat16* bias_data,
                         const std::vector<at::Tensor>& lora) {
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0), depth = packed.size(1) * 2;
  const bool has_lora = !lora.empty();
  const std::vector<BFloat16> rows = padded_rows(x.data_ptr<BFloat16>(), M, K, depth);
  Lora operands{};
  std::vector<BFloat16> xa;
  if (has_lora) {
    operands = lora_operands(lora, depth, blocks);
    xa = lora_hidden<Block>(rows, M, depth, operands);
  }
  auto out = at::empty({M, N}, x.options());
  const BFloat16* w_data = packed.data_ptr<BFloat16>();
  BFloat16* out_data = out.data_ptr<BFloat16>();

  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    typename Block::Scope scope;
    float acc[kRows * kColumns];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kColumns, columns = std::min(kColumns, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const int64_t block_rows = std::min(kRows, M - m0);
        Block block(acc);
        const BFloat16* weights = w_data + b * depth * kColumns;
        const BFloat16* next = b + 1 < end ? weights + depth * kColumns : nullptr;  // this thread's next block
        block.add(rows.data() + m0 * depth, depth, block_rows, weights, depth, next);
        if (has_lora && operands.blocks[3 * b + 2] > 0) {
          const int64_t* up = operands.blocks + 3 * b;  // (offset, first row, depth)
          block.add(xa.data() + m0 * operands.width + up[1], operands.width, block_rows, operands.up + up[0], up[2]);
        }
        block.finish();
        block_epilogue(acc, block_rows, n0, columns, N, bias_data, out_data + m0 * N);
      }
    }
  });
  return out;
}

bool use_tiles() {
#if THRIFTY_NATIVE_AMX
  return amx_allowed() && tiles_permitted();
#else
  return false;
#endif
}

}  // namespace

bool decode_linear_uses_amx() { return use_tiles(); }

at::Tensor decode_linear_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "decode_linear_pack: a bf16 [out, in] weight");
  return pack_blocks(weight);
}

std::vector<at::Tensor> decode_lora_pack(const at::Tensor& a_t, const at::Tensor& bt, const std::vector<int64_t>& ranks,
                                         const std::vector<int64_t>& sizes) {
  int64_t rank = 0, N = 0;
  for (int64_t r : ranks) rank += r;
  for (int64_t n : sizes) N += n;
  TORCH_CHECK(!ranks.empty() && ranks.size() == sizes.size() && a_t.dim() == 2 && bt.dim() == 2 &&
                  a_t.size(1) == rank && bt.size(0) == rank && bt.size(1) == N && a_t.scalar_type() == at::kFloat &&
                  bt.scalar_type() == at::kFloat,
              "decode_lora_pack: float A^T [in, sum(ranks)] and block-diagonal B^T [sum(ranks), sum(sizes)]");
  const auto [a_hi, a_lo] = split_hi_lo(a_t.t());
  const auto [b_hi, b_lo] = split_hi_lo(bt.t());  // [N, rank]

  const int64_t adapters = static_cast<int64_t>(ranks.size());
  auto segments = at::empty({adapters, 3}, at::kLong);
  int64_t* seg = segments.data_ptr<int64_t>();
  std::vector<at::Tensor> rows;  // the up-projection's input rows in segment order, as columns of [N, width]
  std::vector<int64_t> column_end(adapters), segment_end(adapters);
  for (int64_t j = 0, first = 0, start = 0, column = 0; j < adapters; ++j) {
    const int64_t r = ranks[j], width = round_up(3 * r, kDepth);
    seg[3 * j] = first, seg[3 * j + 1] = r, seg[3 * j + 2] = start;
    if (r > 0) {
      for (const at::Tensor* part : {&b_hi, &b_lo, &b_hi}) rows.push_back(part->narrow(1, first, r));
      rows.push_back(b_hi.new_zeros({N, width - 3 * r}));
    }
    first += r, start += width, column += sizes[j];
    column_end[j] = column, segment_end[j] = start;
  }
  const int64_t width = segment_end.back();
  const auto up_rows = rows.empty() ? b_hi.new_zeros({N, 0}) : at::cat(rows, 1).contiguous();

  const int64_t column_blocks = (N + kColumns - 1) / kColumns;
  auto blocks = at::empty({column_blocks, 3}, at::kLong);
  int64_t* blk = blocks.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t b = 0; b < column_blocks; ++b) {
    // The adapters holding the block's first and last columns, and every one between.
    const int64_t first_column = b * kColumns, last_column = std::min(N, first_column + kColumns) - 1;
    const int64_t j0 = std::upper_bound(column_end.begin(), column_end.end(), first_column) - column_end.begin();
    const int64_t j1 = std::upper_bound(column_end.begin(), column_end.end(), last_column) - column_end.begin();
    const int64_t begin = j0 == 0 ? 0 : segment_end[j0 - 1];
    blk[3 * b] = total, blk[3 * b + 1] = begin, blk[3 * b + 2] = segment_end[j1] - begin;
    total += blk[3 * b + 2] * kColumns;
  }
  auto up = at::empty({total}, up_rows.options());
  const BFloat16* src = up_rows.data_ptr<BFloat16>();
  BFloat16* dst = up.data_ptr<BFloat16>();
  for (int64_t b = 0; b < column_blocks; ++b) {
    pack_vnni_transposed(src + b * kColumns * width + blk[3 * b + 1], width, N - b * kColumns, blk[3 * b + 2],
                         kColumns, dst + blk[3 * b]);
  }
  return {pack_blocks(at::cat({a_hi, a_lo})), up, segments, blocks};
}

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                         const c10::optional<at::Tensor>& bias, const std::vector<at::Tensor>& lora) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "decode_linear: x must be a contiguous bf16 [rows, in] tensor");
  const int64_t K = x.size(1), N = out_features, blocks = packed.size(0), depth = packed.size(1) * 2;
  TORCH_CHECK(depth == round_up(K, kDepth) && blocks * kColumns >= N, "decode_linear: packed weight does not fit x");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kBFloat16 && bias->is_contiguous()),
              "decode_linear: bias must be contiguous bf16");

  const BFloat16* bias_data = bias.has_value() ? bias->data_ptr<BFloat16>() : nullptr;
#if THRIFTY_NATIVE_AMX
  if (use_tiles()) return decode_blocks<TileBlock>(x, packed, N, bias_data, lora);
#endif
  return decode_blocks<VectorBlock>(x, packed, N, bias_data, lora);
}

#else

bool decode_linear_uses_amx() { return false; }
at::Tensor decode_linear_pack(const at::Tensor&) { TORCH_CHECK(false, "decode_linear needs a CPU with AVX-512 BF16"); }
std::vector<at::Tensor> decode_lora_pack(const at::Tensor&, const at::Tensor&, const std::vector<int64_t>&,
                                         const std::vector<int64_t>&) {
  TORCH_CHECK(false, "decode_linear needs a CPU with AVX-512 BF16");
}
at::Tensor decode_linear(const at::Tensor&, const at::Tensor&, int64_t, const c10::optional<at::Tensor>&,
                         const std::vector<at::Tensor>&) {
  TORCH_CHECK(false, "decode_linear needs a CPU with AVX-512 BF16");
}

#endif

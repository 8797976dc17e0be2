// Linear layers at decoding batch sizes (a few dozen rows) in bf16, with the bias and
// the LoRA branch fused into the matmul's epilogue.
//
// A decoding step reads every weight of the model from memory for a handful of rows,
// so its matmuls are bound by how fast they stream their weights. oneDNN's pre-packed
// matmul streamed cold weights at 8-11 GB/s here (32 rows) where a plain read gets 20.
// Here the weight is packed in blocks of 32 output columns, each block contiguous in the
// VNNI layout brgemm reads, and each thread takes a contiguous range of blocks: one
// sequential stream per core. Measured on cold weights, 32 rows: 1.2-2x faster than
// oneDNN per layer shape.
//
// The epilogue adds the bias and scaling * B (A x) in float before the one rounding to
// bf16. A x is computed here too (A^T and B^T come stored input-major), so a layer's
// adapters cost two tiny in-cache products rather than four PyTorch ops (cast, two
// fp32 matmuls, a mixed-dtype add).
#include "native.h"

#if THRIFTY_NATIVE_AVX512
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <vector>

namespace {

using at::BFloat16;
namespace cpublas = at::native::cpublas;

constexpr int64_t kColumns = 32;  // output columns per packed block (best of 32-256 measured)
constexpr int64_t kRows = 64;     // input rows per brgemm call

// x A^T for `Rows` rows and ranks [r0, r0 + 32): independent accumulators for every
// (row, rank vector), fully unrolled so they stay in registers. One accumulator chain
// per rank vector made this latency-bound, 4x slower than the layer's matmul itself.
template <int Rows>
void lora_down_block(const float* x, int64_t K, const float* a_t, int64_t rank, int64_t r0, float* xa) {
  const int count0 = static_cast<int>(std::min<int64_t>(16, rank - r0));
  const int count1 = static_cast<int>(std::clamp<int64_t>(rank - r0 - 16, 0, 16));
  __m512 acc0[Rows], acc1[Rows];
#pragma GCC unroll 8
  for (int i = 0; i < Rows; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 a0 = load16(a_t + k * rank + r0, count0);
    const __m512 a1 = count1 > 0 ? load16(a_t + k * rank + r0 + 16, count1) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int i = 0; i < Rows; ++i) {
      const __m512 xk = _mm512_set1_ps(x[i * K + k]);  // a broadcast load: no shuffle-port uop
      acc0[i] = _mm512_fmadd_ps(xk, a0, acc0[i]);
      if (count1 > 0) acc1[i] = _mm512_fmadd_ps(xk, a1, acc1[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < Rows; ++i) {
    store16(xa + i * rank + r0, acc0[i], count0);
    if (count1 > 0) store16(xa + i * rank + r0 + 16, acc1[i], count1);
  }
}

// x A^T for every row: [rows, rank] float, from x in bf16 and A^T in float [K, rank].
// Vectorised over the rank, so there is no horizontal sum; on the calling thread: for
// 32 rows, K = 576 and rank 48 it is ~40k vector FMAs, less than waking a second thread.
std::vector<float> lora_down(const BFloat16* x, int64_t rows, int64_t K, const float* a_t, int64_t rank) {
  // x in float first, so the FMA loop broadcasts straight from memory.
  std::vector<float> xf(rows * K);
  for (int64_t i = 0; i < rows * K; i += 16) {
    const int count = static_cast<int>(std::min<int64_t>(16, rows * K - i));
    store16(xf.data() + i, load16(x + i, count), count);
  }
  std::vector<float> xa(rows * rank);
  for (int64_t r0 = 0; r0 < rank; r0 += 32) {
    int64_t m = 0;
    for (; m + 8 <= rows; m += 8) lora_down_block<8>(xf.data() + m * K, K, a_t, rank, r0, xa.data() + m * rank);
    for (; m < rows; ++m) lora_down_block<1>(xf.data() + m * K, K, a_t, rank, r0, xa.data() + m * rank);
  }
  return xa;
}

// `Rows` rows of one packed block's output: acc [Rows, 32] float from brgemm, plus the
// bias and xa [Rows, rank] times B^T's columns [n0, n0 + columns), rounded once to bf16.
// 2 x Rows independent FMA chains over the rank (one chain per output vector was
// latency-bound).
template <int Rows>
void epilogue_rows(const float* acc, int64_t n0, int64_t columns, int64_t N, const BFloat16* bias,
                   const float* xa, const float* bt, int64_t rank, BFloat16* out) {
  const int count0 = static_cast<int>(std::min<int64_t>(16, columns));
  const int count1 = static_cast<int>(std::clamp<int64_t>(columns - 16, 0, 16));
  const __m512 bias0 = bias != nullptr ? load16(bias + n0, count0) : _mm512_setzero_ps();
  const __m512 bias1 = bias != nullptr ? load16(bias + n0 + 16, count1) : _mm512_setzero_ps();
  __m512 value0[Rows], value1[Rows];
#pragma GCC unroll 8
  for (int i = 0; i < Rows; ++i) {
    value0[i] = _mm512_add_ps(load16(acc + i * kColumns), bias0);
    value1[i] = _mm512_add_ps(load16(acc + i * kColumns + 16), bias1);
  }
  for (int64_t r = 0; r < rank; ++r) {
    const __m512 b0 = load16(bt + r * N + n0, count0);
    const __m512 b1 = load16(bt + r * N + n0 + 16, count1);
#pragma GCC unroll 8
    for (int i = 0; i < Rows; ++i) {
      const __m512 xr = _mm512_set1_ps(xa[i * rank + r]);
      value0[i] = _mm512_fmadd_ps(xr, b0, value0[i]);
      value1[i] = _mm512_fmadd_ps(xr, b1, value1[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < Rows; ++i) {
    store16(out + i * N + n0, value0[i], count0);
    store16(out + i * N + n0 + 16, value1[i], count1);
  }
}

void block_epilogue(const float* acc, int64_t rows, int64_t n0, int64_t columns, int64_t N,
                    const BFloat16* bias, const float* xa, const float* bt, int64_t rank, BFloat16* out) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) {
    epilogue_rows<4>(acc + m * kColumns, n0, columns, N, bias, xa + m * rank, bt, rank, out + m * N);
  }
  for (; m < rows; ++m) {
    epilogue_rows<1>(acc + m * kColumns, n0, columns, N, bias, xa + m * rank, bt, rank, out + m * N);
  }
}

}  // namespace

at::Tensor decode_linear_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.size(1) % 2 == 0,
              "decode_linear_pack: a bf16 [out, in] weight with an even `in`");
  const auto w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), blocks = (N + kColumns - 1) / kColumns;
  auto packed = at::empty({blocks, K / 2, kColumns, 2}, w.options());
  const BFloat16* src = w.data_ptr<BFloat16>();
  BFloat16* dst = packed.data_ptr<BFloat16>();
  // Block b is W^T of output columns [32 b, 32 b + 32), zero past the last one.
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      pack_vnni_transposed(src + b * kColumns * K, K, N - b * kColumns, K, kColumns, dst + b * K * kColumns);
    }
  });
  return packed;
}

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& lora_at,
                         const c10::optional<at::Tensor>& lora_bt) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "decode_linear: x must be a contiguous bf16 [rows, in] tensor");
  const int64_t M = x.size(0), K = x.size(1), N = out_features, blocks = packed.size(0);
  TORCH_CHECK(packed.size(1) * 2 == K && blocks * kColumns >= N, "decode_linear: packed weight does not fit x");
  const bool has_lora = lora_at.has_value();
  const int64_t rank = has_lora ? lora_at->size(1) : 0;
  if (has_lora) {
    TORCH_CHECK(lora_at->scalar_type() == at::kFloat && lora_at->is_contiguous() && lora_at->size(0) == K &&
                    lora_bt.has_value() && lora_bt->scalar_type() == at::kFloat && lora_bt->is_contiguous() &&
                    lora_bt->size(0) == rank && lora_bt->size(1) == N,
                "decode_linear: LoRA needs float A^T [in, rank] and scaled B^T [rank, out], contiguous");
  }
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kBFloat16 && bias->is_contiguous()),
              "decode_linear: bias must be contiguous bf16");

  auto out = at::empty({M, N}, x.options());
  const BFloat16* x_data = x.data_ptr<BFloat16>();
  const BFloat16* w_data = packed.data_ptr<BFloat16>();
  const BFloat16* bias_data = bias.has_value() ? bias->data_ptr<BFloat16>() : nullptr;
  const std::vector<float> xa = has_lora ? lora_down(x_data, M, K, lora_at->data_ptr<float>(), rank)
                                         : std::vector<float>();
  const float* bt = has_lora ? lora_bt->data_ptr<float>() : nullptr;
  BFloat16* out_data = out.data_ptr<BFloat16>();

  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(kRows * kColumns);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kColumns, columns = std::min(kColumns, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const int64_t rows = std::min(kRows, M - m0);
        cpublas::brgemm(rows, kColumns, K, K, kColumns, kColumns, false, x_data + m0 * K,
                        w_data + b * K * kColumns, acc.data());
        block_epilogue(acc.data(), rows, n0, columns, N, bias_data, xa.data() + m0 * rank, bt, rank,
                       out_data + m0 * N);
      }
    }
    cpublas::brgemm_release();
  });
  return out;
}

#else

at::Tensor decode_linear_pack(const at::Tensor&) { TORCH_CHECK(false, "decode_linear needs AVX-512 BF16"); }
at::Tensor decode_linear(const at::Tensor&, const at::Tensor&, int64_t, const c10::optional<at::Tensor>&,
                         const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&) {
  TORCH_CHECK(false, "decode_linear needs AVX-512 BF16");
}

#endif

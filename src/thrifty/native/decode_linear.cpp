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

// x A^T for every row: [rows, rank] float, from x in bf16 and A^T in float [K, rank].
// Vectorised over the rank, so there is no horizontal sum; on the calling thread: for
// 32 rows, K = 576 and rank 48 it is ~55k vector FMAs, less than waking a second thread.
std::vector<float> lora_down(const BFloat16* x, int64_t rows, int64_t K, const float* a_t, int64_t rank) {
  std::vector<float> xa(rows * rank);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t r0 = 0; r0 < rank; r0 += 64) {
      const int64_t chunks = (std::min<int64_t>(64, rank - r0) + 15) / 16;
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t k = 0; k < K; ++k) {
        const __m512 xk = _mm512_set1_ps(static_cast<float>(x[m * K + k]));
        for (int64_t c = 0; c < chunks; ++c) {
          const int count = static_cast<int>(std::min<int64_t>(16, rank - r0 - 16 * c));
          acc[c] = _mm512_fmadd_ps(xk, load16(a_t + k * rank + r0 + 16 * c, count), acc[c]);
        }
      }
      for (int64_t c = 0; c < chunks; ++c) {
        const int count = static_cast<int>(std::min<int64_t>(16, rank - r0 - 16 * c));
        store16(xa.data() + m * rank + r0 + 16 * c, acc[c], count);
      }
    }
  }
  return xa;
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
        for (int64_t m = 0; m < rows; ++m) {
          for (int64_t j = 0; j < columns; j += 16) {
            const int count = static_cast<int>(std::min<int64_t>(16, columns - j));
            __m512 value = load16(acc.data() + m * kColumns + j);
            if (bias_data != nullptr) value = _mm512_add_ps(value, load16(bias_data + n0 + j, count));
            for (int64_t r = 0; r < rank; ++r) {
              value = _mm512_fmadd_ps(_mm512_set1_ps(xa[(m0 + m) * rank + r]), load16(bt + r * N + n0 + j, count),
                                      value);
            }
            store16(out_data + (m0 + m) * N + n0 + j, value, count);
          }
        }
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

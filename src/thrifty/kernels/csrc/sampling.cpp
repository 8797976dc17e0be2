// One token per row drawn from softmax(logits / temperature) over the whole vocabulary.
//
// In PyTorch ops this is a float copy, a softmax, a cumulative sum and a search over
// [rows, vocab]: ~7 ms of a ~75 ms decoding step at 32 rows over 49k tokens. Here each
// row is read once for its max, once for exp (kept in a per-thread buffer) and their
// sum, and scanned 16 at a time for the first index whose running sum passes
// uniform * total: the same inverse-CDF rule as the PyTorch path (sampling.py).
#include "native.h"

#if THRIFTY_NATIVE_AVX512
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// weights and block_sums are per-thread buffers of V and ceil(V / 16) floats. Sums run
// in double, as PyTorch's CPU cumsum accumulates float: over 49k tokens a float running
// sum drifts by more than the smaller tokens' probabilities.
template <typename T>
int64_t sample_row(const T* logits, int64_t V, float inverse_temperature, float uniform, float* weights,
                   float* block_sums) {
  __m512 max_vec = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < V; i += 16) {
    const int count = static_cast<int>(std::min<int64_t>(16, V - i));
    max_vec = _mm512_mask_max_ps(max_vec, static_cast<__mmask16>((1u << count) - 1), max_vec,
                                 load16(logits + i, count));
  }
  const __m512 max_logit = _mm512_set1_ps(_mm512_reduce_max_ps(max_vec));
  double total = 0.0;
  for (int64_t i = 0; i < V; i += 16) {
    const int count = static_cast<int>(std::min<int64_t>(16, V - i));
    const Vec scaled(_mm512_mul_ps(_mm512_sub_ps(load16(logits + i, count), max_logit),
                                   _mm512_set1_ps(inverse_temperature)));
    const Vec w = Vec::set(Vec(0.f), scaled.exp(), count);
    w.store(weights + i, count);
    block_sums[i / 16] = _mm512_reduce_add_ps(w);
    total += block_sums[i / 16];
  }
  const double target = uniform * total;
  double running = 0.0;
  for (int64_t i = 0; i < V; i += 16) {
    if (running + block_sums[i / 16] <= target) {
      running += block_sums[i / 16];
      continue;
    }
    for (int64_t j = i; j < std::min<int64_t>(V, i + 16); ++j) {
      running += weights[j];
      if (running > target) return j;
    }
  }
  // Rounding left the running sum short of the target: the last token that can be drawn.
  int64_t last = V - 1;
  while (last > 0 && weights[last] == 0.f) --last;
  return last;
}

}  // namespace

at::Tensor sample_tokens(const at::Tensor& logits, const at::Tensor& uniform, double temperature) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 &&
                  (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16),
              "sample_tokens: float or bf16 [rows, vocab] logits with a contiguous last dim");
  TORCH_CHECK(uniform.scalar_type() == at::kFloat && uniform.numel() == logits.size(0) && temperature > 0,
              "sample_tokens: one float uniform number per row and a positive temperature");
  const int64_t B = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  auto out = at::empty({B}, logits.options().dtype(at::kLong));
  const auto u = uniform.contiguous();
  const float* u_data = u.data_ptr<float>();
  int64_t* out_data = out.data_ptr<int64_t>();
  const float inverse_temperature = static_cast<float>(1.0 / temperature);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(V), block_sums((V + 15) / 16);
    for (int64_t b = begin; b < end; ++b) {
      out_data[b] = logits.scalar_type() == at::kFloat
                        ? sample_row(logits.data_ptr<float>() + b * row_stride, V, inverse_temperature, u_data[b],
                                     weights.data(), block_sums.data())
                        : sample_row(logits.data_ptr<at::BFloat16>() + b * row_stride, V, inverse_temperature,
                                     u_data[b], weights.data(), block_sums.data());
    }
  });
  return out;
}

#else

at::Tensor sample_tokens(const at::Tensor&, const at::Tensor&, double) {
  TORCH_CHECK(false, "sample_tokens needs AVX-512 BF16");
}

#endif

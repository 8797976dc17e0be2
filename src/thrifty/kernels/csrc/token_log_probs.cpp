// Per-row log-softmax statistics of a chunk of LM-head logits, and d log p / d logits.
//
// losses.py applies the head a chunk of rows at a time. In PyTorch ops each chunk went
// through a float copy, log_softmax, exp, neg, an indexed add and a cast back: ~65 ms
// per 341 x 49k chunk, ~10% of a LoRA SFT step, where the data is read once from memory
// here (a row of logits fits in L2; three passes over it: max, sum of exps, gradient).
#include "native.h"

#if THRIFTY_NATIVE_AVX512
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

namespace {

using Vec = at::vec::Vectorized<float>;

template <typename T>
void rows(T* logits, int64_t n, int64_t vocab, const int64_t* targets, float inv_temperature,
          const float* grad_scale, float* log_probs) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    const int64_t full = vocab / 16 * 16;
    for (int64_t i = begin; i < end; ++i) {
      T* row = logits + i * vocab;
      const __m512 vt = _mm512_set1_ps(inv_temperature);
      __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < full; j += 16) vmax = _mm512_max_ps(vmax, load16(row + j));
      float top = _mm512_reduce_max_ps(vmax);
      for (int64_t j = full; j < vocab; ++j) top = std::max(top, float(row[j]));
      top *= inv_temperature;  // temperature > 0: the max of x / t is max(x) / t
      const __m512 vtop = _mm512_set1_ps(top);
      __m512 vsum = _mm512_setzero_ps();
      for (int64_t j = 0; j < full; j += 16) {
        vsum = _mm512_add_ps(vsum, __m512(Vec(_mm512_fmsub_ps(load16(row + j), vt, vtop)).exp_u20()));
      }
      float sum = _mm512_reduce_add_ps(vsum);
      for (int64_t j = full; j < vocab; ++j) sum += std::exp(float(row[j]) * inv_temperature - top);
      const float lse = top + std::log(sum);
      const int64_t target = targets[i];
      const float log_p = float(row[target]) * inv_temperature - lse;
      log_probs[i] = log_p;
      if (grad_scale == nullptr) continue;
      // d log p_target / d x_j = (onehot_j - softmax_j) / t; scaled by the row's upstream grad.
      const float scale = grad_scale[i];
      const __m512 vneg = _mm512_set1_ps(-scale), vlse = _mm512_set1_ps(lse);
      for (int64_t j = 0; j < full; j += 16) {
        const __m512 p = Vec(_mm512_fmsub_ps(load16(row + j), vt, vlse)).exp_u20();
        store16(row + j, _mm512_mul_ps(p, vneg));
      }
      for (int64_t j = full; j < vocab; ++j) row[j] = T(-scale * std::exp(float(row[j]) * inv_temperature - lse));
      row[target] = T(-std::expm1(log_p) * scale);  // (1 - p_target) * scale
    }
  });
}

}  // namespace

at::Tensor token_log_probs(at::Tensor logits, const at::Tensor& targets, double temperature,
                           const c10::optional<at::Tensor>& grad_scale) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.device().is_cpu(),
              "token_log_probs: contiguous [rows, vocab] CPU logits");
  TORCH_CHECK(logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kFloat,
              "token_log_probs: bf16 or float32 logits");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const at::Tensor ids = targets.to(at::kLong).contiguous();
  TORCH_CHECK(ids.numel() == n, "token_log_probs: one target per row");
  auto log_probs = at::empty({n}, logits.options().dtype(at::kFloat));
  at::Tensor scale;
  if (grad_scale.has_value()) {
    scale = grad_scale->to(at::kFloat).contiguous();
    TORCH_CHECK(scale.numel() == n, "token_log_probs: one gradient scale per row");
  }
  const float* scale_data = grad_scale.has_value() ? scale.data_ptr<float>() : nullptr;
  const float inv_t = static_cast<float>(1.0 / temperature);
  if (logits.scalar_type() == at::kBFloat16) {
    rows(logits.data_ptr<at::BFloat16>(), n, vocab, ids.data_ptr<int64_t>(), inv_t, scale_data,
         log_probs.data_ptr<float>());
  } else {
    rows(logits.data_ptr<float>(), n, vocab, ids.data_ptr<int64_t>(), inv_t, scale_data,
         log_probs.data_ptr<float>());
  }
  return log_probs;
}

#else

at::Tensor token_log_probs(at::Tensor, const at::Tensor&, double, const c10::optional<at::Tensor>&) {
  TORCH_CHECK(false, "token_log_probs needs a CPU with AVX-512 BF16");
}

#endif

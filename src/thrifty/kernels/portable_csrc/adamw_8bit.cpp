// AdamW's step with bitsandbytes' block-wise 8-bit moments (training/adamw_8bit.py holds
// the definition and the PyTorch version this equals to float32 rounding): each block of
// 256 moments is dequantized, updated with the gradient, used for the weights' update and
// quantized again to its nearest code values under the block's new scale, in one pass
// over the tensor instead of PyTorch's dozen (its bucketize alone costs ~40 ns a value).
#include "portable.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;

// Index of the nearest value of a sorted 256-entry code: the number of the 255 midpoints
// below x (bucketize's convention: a value on a midpoint goes to the lower index).
inline int count_below(const float* midpoints, float x) {
  int idx = 0;
  for (int step = 128; step >= 1; step >>= 1) idx += (midpoints[idx + step - 1] < x) ? step : 0;
  return idx;
}

// The same answer from a table indexed by the float's top 16 bits (sign, exponent, 7
// fraction bits: cells at most 0.8% of their values wide, about the dynamic codes' finest
// relative gaps; the table's build checks that no cell holds two midpoints): the count
// below the cell's lowest value, plus one comparison, instead of 8 dependent loads.
struct NearestTable {
  float midpoints[256];  // 255 midpoints and +inf, so that lo + 1 never reads past the end
  uint8_t lowest[1 << 16];
  bool exact = true;

  explicit NearestTable(const float* code) {
    for (int k = 0; k < 255; ++k) midpoints[k] = (code[k] + code[k + 1]) / 2.0f;
    midpoints[255] = INFINITY;
    for (uint32_t key = 0; key < (1u << 16); ++key) {
      float a, b;
      uint32_t lo_bits = key << 16, hi_bits = (key << 16) | 0xFFFFu;
      std::memcpy(&a, &lo_bits, 4);
      std::memcpy(&b, &hi_bits, 4);
      // Inputs are clamped to [-1, 1]; cells beyond (and NaN/inf patterns) never occur.
      float low = std::clamp(std::fmin(a, b), -1.0f, 1.0f), high = std::clamp(std::fmax(a, b), -1.0f, 1.0f);
      if (std::isnan(a) || std::isnan(b)) low = high = 1.0f;
      const int first = count_below(midpoints, low);
      lowest[key] = static_cast<uint8_t>(first);
      exact = exact && count_below(midpoints, high) - first <= 1;
    }
  }

  inline uint8_t operator()(float x) const {
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    const int first = lowest[bits >> 16];
    return static_cast<uint8_t>(first + (midpoints[first] < x ? 1 : 0));
  }
};

// Tables built once per code (an optimizer has two codes; building one takes ~3 ms).
const NearestTable& table_for(const float* code) {
  static std::mutex lock;
  static std::vector<std::pair<std::vector<float>, std::unique_ptr<NearestTable>>> tables;
  std::lock_guard<std::mutex> guard(lock);
  for (const auto& [values, table] : tables)
    if (std::memcmp(values.data(), code, 256 * sizeof(float)) == 0) return *table;
  tables.emplace_back(std::vector<float>(code, code + 256), std::make_unique<NearestTable>(code));
  return *tables.back().second;
}

void quantize_block(const float* values, int64_t n, const NearestTable& table, uint8_t* out, float* absmax) {
  float top = 0.0f;
  for (int64_t j = 0; j < n; ++j) top = std::max(top, std::fabs(values[j]));
  *absmax = top;
  const float inverse = top > 0.0f ? 1.0f / top : 0.0f;
  for (int64_t j = 0; j < n; ++j) out[j] = table(std::clamp(values[j] * inverse, -1.0f, 1.0f));
}

}  // namespace

namespace {

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }

// The step for weights of type W (float, or bf16 with a bf16 low half `low`, so that
// high + low carries 16 bits of mantissa) and gradients of type G (float or bf16), scaled
// by grad_scale (gradient clipping) as they are read: no float32 copy of either is made.
template <typename W, typename G>
void step_blocks(W* w, W* low, const G* g, float grad_scale, uint8_t* s1, uint8_t* s2, float* a1, float* a2,
                 const float* c1, const float* c2, int64_t n, double beta1, double beta2, double eps, int64_t step,
                 double lr, double weight_decay) {
  const NearestTable &table1 = table_for(c1), &table2 = table_for(c2);
  TORCH_CHECK(table1.exact && table2.exact, "a code whose values are closer than the lookup table's cells");
  // The scalars as the PyTorch version forms them (Python floats, rounded to float32).
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float one_minus_b1 = static_cast<float>(1.0 - beta1), one_minus_b2 = static_cast<float>(1.0 - beta2);
  const float correction2 = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step)));
  const float step_size = static_cast<float>(-lr / (1.0 - std::pow(beta1, step)));
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  const float epsilon = static_cast<float>(eps);
  const bool decays = weight_decay > 0.0;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    float m[kBlock], v[kBlock];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * kBlock, count = std::min(kBlock, n - start);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t i = start + j;
        const float gi = to_float(g[i]) * grad_scale;
        m[j] = c1[s1[i]] * a1[b] * b1 + one_minus_b1 * gi;
        v[j] = c2[s2[i]] * a2[b] * b2 + one_minus_b2 * gi * gi;
        float wi = to_float(w[i]);
        if constexpr (std::is_same_v<W, at::BFloat16>) wi += to_float(low[i]);
        if (decays) wi *= decay;
        wi += step_size * (m[j] / (std::sqrt(v[j]) / correction2 + epsilon));
        if constexpr (std::is_same_v<W, at::BFloat16>) {
          const at::BFloat16 high = wi;  // round to nearest even
          w[i] = high;
          low[i] = wi - static_cast<float>(high);  // exact in float32, then rounded to bf16
        } else {
          w[i] = wi;
        }
      }
      quantize_block(m, count, table1, s1 + start, a1 + b);
      quantize_block(v, count, table2, s2 + start, a2 + b);
    }
  });
}

}  // namespace

void adamw_8bit_step(at::Tensor& weights, const c10::optional<at::Tensor>& low, const at::Tensor& grad,
                     double grad_scale, at::Tensor& state1, at::Tensor& state2, at::Tensor& absmax1,
                     at::Tensor& absmax2, const at::Tensor& code1, const at::Tensor& code2, double beta1,
                     double beta2, double eps, int64_t step, double lr, double weight_decay) {
  const bool bf16 = weights.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || weights.scalar_type() == at::kFloat, "float32 or bfloat16 weights");
  TORCH_CHECK(bf16 == (low.has_value() && low->scalar_type() == at::kBFloat16 && low->numel() == weights.numel()),
              "bfloat16 weights come with their bfloat16 low half (and only they)");
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kBFloat16, "float32 or bfloat16 grad");
  TORCH_CHECK(weights.is_contiguous() && grad.is_contiguous() && state1.is_contiguous() && state2.is_contiguous() &&
              (!bf16 || low->is_contiguous()), "contiguous tensors");
  TORCH_CHECK(state1.scalar_type() == at::kByte && state2.scalar_type() == at::kByte, "uint8 moments");
  const int64_t n = weights.numel();
  TORCH_CHECK(grad.numel() == n && state1.numel() == n && state2.numel() == n, "tensors of one size");
  TORCH_CHECK(absmax1.numel() == (n + kBlock - 1) / kBlock && absmax2.numel() == absmax1.numel(),
              "one scale per block of 256");
  TORCH_CHECK(code1.numel() == 256 && code2.numel() == 256 && code1.scalar_type() == at::kFloat &&
              code2.scalar_type() == at::kFloat, "two float32 codes of 256 values");
  auto run = [&](auto* w, auto* lo, const auto* g) {
    step_blocks(w, lo, g, static_cast<float>(grad_scale), state1.data_ptr<uint8_t>(), state2.data_ptr<uint8_t>(),
                absmax1.data_ptr<float>(), absmax2.data_ptr<float>(), code1.data_ptr<float>(),
                code2.data_ptr<float>(), n, beta1, beta2, eps, step, lr, weight_decay);
  };
  const bool bf16_grad = grad.scalar_type() == at::kBFloat16;
  if (bf16) {
    auto* w = weights.data_ptr<at::BFloat16>();
    auto* lo = low->data_ptr<at::BFloat16>();
    if (bf16_grad) run(w, lo, grad.data_ptr<at::BFloat16>()); else run(w, lo, grad.data_ptr<float>());
  } else {
    auto* w = weights.data_ptr<float>();
    float* no_low = nullptr;
    if (bf16_grad) run(w, no_low, grad.data_ptr<at::BFloat16>()); else run(w, no_low, grad.data_ptr<float>());
  }
}

// Attention of one new query per row over the KV cache (token generation), bf16.
//
// PyTorch's CPU flash attention spent ~320 us per layer on a 32-row decoding step
// (9 query heads of 64 over ~50 cached keys: ~1 MFLOP), ~10% of the step: its per-call
// blocking and buffers are sized for long query blocks. Here each (row, head) is one
// pass over its keys with 16-lane float arithmetic: scores, softmax, weighted values,
// the output rounded to bf16 once, as flash attention does.
#include "native.h"

#if THRIFTY_NATIVE_AVX512
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

// Turn scores [S] into exp(score - max) in place; returns their sum (0 if none visible).
float softmax_weights(float* scores, int64_t S) {
  Vec max_vec(kMinusInf);
  for (int64_t s = 0; s < S; s += Vec::size()) {
    max_vec = at::vec::maximum(max_vec, Vec::loadu(scores + s, std::min<int64_t>(Vec::size(), S - s)));
  }
  const float max_score = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); },
                                                         max_vec);
  if (max_score == kMinusInf) {
    std::fill(scores, scores + S, 0.f);
    return 0.f;
  }
  Vec sum(0.f);
  for (int64_t s = 0; s < S; s += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), S - s);
    const Vec weights = (Vec::loadu(scores + s, count) - Vec(max_score)).exp();  // exp(-inf) = 0
    weights.store(scores + s, count);
    sum = sum + Vec::set(Vec(0.f), weights, count);
  }
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sum);
}

// The `group` query heads that share one kv head, over that head's keys and values.
// kChunks = head_dim / 16 is a compile-time constant so every vector stays in registers.
template <int kChunks>
void attend(const at::BFloat16* const* queries, int64_t group, const at::BFloat16* keys, int64_t key_row,
            const at::BFloat16* values, int64_t value_row, const bool* mask, int64_t mask_step, int64_t S,
            float scale, float* scores, at::BFloat16* const* outs) {
  for (int64_t g = 0; g < group; ++g) {
    __m512 q[kChunks];
    for (int c = 0; c < kChunks; ++c) q[c] = _mm512_mul_ps(load16(queries[g] + 16 * c), _mm512_set1_ps(scale));
    float* row = scores + g * S;
    for (int64_t s = 0; s < S; ++s) {
      if (mask != nullptr && !mask[s * mask_step]) {
        row[s] = kMinusInf;
        continue;
      }
      __m512 dot = _mm512_mul_ps(q[0], load16(keys + s * key_row));
      for (int c = 1; c < kChunks; ++c) dot = _mm512_fmadd_ps(q[c], load16(keys + s * key_row + 16 * c), dot);
      row[s] = _mm512_reduce_add_ps(dot);
    }
    const float total = softmax_weights(row, S);
    __m512 acc[kChunks];
    for (int c = 0; c < kChunks; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; ++s) {
      if (row[s] == 0.f) continue;
      const __m512 w = _mm512_set1_ps(row[s]);
      for (int c = 0; c < kChunks; ++c) acc[c] = _mm512_fmadd_ps(w, load16(values + s * value_row + 16 * c), acc[c]);
    }
    const __m512 inverse = _mm512_set1_ps(total > 0.f ? 1.f / total : 0.f);  // no visible key: zeros
    for (int c = 0; c < kChunks; ++c) store16(outs[g] + 16 * c, _mm512_mul_ps(acc[c], inverse));
  }
}

}  // namespace

bool decode_attention_supports(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(query.dim() == 4 && query.size(2) == 1 && query.scalar_type() == at::kBFloat16 &&
                  key.scalar_type() == at::kBFloat16 && value.scalar_type() == at::kBFloat16 &&
                  query.stride(3) == 1 && key.stride(3) == 1 && value.stride(3) == 1 &&
                  decode_attention_supports(query.size(3)),
              "decode_attention: bf16 [batch, heads, 1, 64 or 128] queries and [batch, kv_heads, keys, "
              "head_dim] keys/values, last dim contiguous");
  const int64_t B = query.size(0), H = query.size(1), D = query.size(3);
  const int64_t Hkv = key.size(1), S = key.size(2), group = H / Hkv;
  at::Tensor mask_t;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4 && mask->size(2) == 1 && mask->size(3) == S,
                "decode_attention: a boolean [batch, 1, 1, keys] mask");
    mask_t = mask->expand({B, 1, 1, S});
  }
  const bool* mask_data = mask.has_value() ? mask_t.data_ptr<bool>() : nullptr;
  const int64_t mask_b = mask.has_value() ? mask_t.stride(0) : 0, mask_s = mask.has_value() ? mask_t.stride(3) : 0;

  auto out = at::empty({B, H, 1, D}, query.options());
  const HeadRows q(query), k(key), v(value);
  at::BFloat16* out_data = out.data_ptr<at::BFloat16>();
  const float scale_f = static_cast<float>(scale);

  // One item per (row, kv head): its keys and values stay in cache for the `group`
  // query heads that share them.
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * S);
    std::vector<const at::BFloat16*> queries(group);
    std::vector<at::BFloat16*> outs(group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, hk = item % Hkv;
      for (int64_t g = 0; g < group; ++g) {
        queries[g] = q.at(b, hk * group + g);
        outs[g] = out_data + (b * H + hk * group + g) * D;
      }
      const bool* row_mask = mask_data != nullptr ? mask_data + b * mask_b : nullptr;
      auto run = D == 64 ? attend<4> : attend<8>;
      run(queries.data(), group, k.at(b, hk), k.row, v.at(b, hk), v.row, row_mask, mask_s, S, scale_f,
          scores.data(), outs.data());
    }
  });
  return out;
}

#else

bool decode_attention_supports(int64_t) { return false; }

at::Tensor decode_attention(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const c10::optional<at::Tensor>&, double) {
  TORCH_CHECK(false, "decode_attention needs AVX-512 BF16");
}

#endif

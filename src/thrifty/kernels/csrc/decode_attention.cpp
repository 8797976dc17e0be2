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

#include <algorithm>
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
    // A partial loadu fills the lanes past `count` with 0, which would win the max when
    // every score is below 0 by far (Qwen2's k bias puts scores near -100): the exps
    // then underflow to a zero sum. Those lanes must be -inf.
    const int64_t count = std::min<int64_t>(Vec::size(), S - s);
    max_vec = at::vec::maximum(max_vec, Vec::set(Vec(kMinusInf), Vec::loadu(scores + s, count), count));
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

// Sum each of 16 vectors across its lanes: lane i of the result is the sum of v[i].
// A transpose-and-add tree (45 shuffles and adds for 16 sums) instead of 16 horizontal
// reductions (~9 dependent instructions each), which dominated the scores.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 pairs[8], quads[4], octs[2];
  for (int i = 0; i < 8; ++i) {  // 256-bit halves: v[2i]'s partial sums, then v[2i+1]'s
    pairs[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lane l: v[4i + l]'s partial sums
    quads[i] = _mm512_add_ps(_mm512_shuffle_f32x4(pairs[2 * i], pairs[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(pairs[2 * i], pairs[2 * i + 1], 0xDD));
  }
  for (int i = 0; i < 2; ++i) {  // lane l: two partials of v[8i + l], two of v[8i + 4 + l]
    octs[i] = _mm512_add_ps(_mm512_shuffle_ps(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_ps(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // Element 4l + j of `sums` is the sum of v[4j + l].
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(octs[0], octs[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_ps(octs[0], octs[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, sums);
}

// Visible keys among s..s+count-1 as a bit mask.
inline __mmask16 visible_keys(const bool* mask, int64_t mask_step, int64_t s, int64_t count) {
  const __mmask16 present = static_cast<__mmask16>((1u << count) - 1);
  if (mask == nullptr) return present;
  if (mask_step == 1) {
    const __m128i m = _mm_maskz_loadu_epi8(present, mask + s);
    return _mm_test_epi8_mask(m, m);
  }
  __mmask16 bits = 0;
  for (int64_t j = 0; j < count; ++j) bits |= static_cast<__mmask16>(mask[(s + j) * mask_step]) << j;
  return bits;
}

// Scaled scores q.k of one query head over keys [S], 16 keys at a time, -inf where
// masked. The bf16 products are exact in dpbf16's float accumulation; kPairs = head_dim
// / 32 bf16 pairs per lane.
template <int kPairs>
void scores_of(const at::BFloat16* query, const at::BFloat16* keys, int64_t key_row, const bool* mask,
               int64_t mask_step, int64_t S, float scale, float* scores) {
  __m512bh q[kPairs];
  for (int c = 0; c < kPairs; ++c) q[c] = (__m512bh)_mm512_loadu_si512(query + 32 * c);
  const __m512 minus_inf = _mm512_set1_ps(kMinusInf);
  for (int64_t s = 0; s < S; s += 16) {
    const int64_t count = std::min<int64_t>(16, S - s);
    __m512 dots[16];
    for (int j = 0; j < 16; ++j) {
      dots[j] = _mm512_setzero_ps();
      if (j >= count) continue;
      const at::BFloat16* key = keys + (s + j) * key_row;
      for (int c = 0; c < kPairs; ++c) {
        dots[j] = _mm512_dpbf16_ps(dots[j], q[c], (__m512bh)_mm512_loadu_si512(key + 32 * c));
      }
    }
    const __m512 scaled = _mm512_mul_ps(sum_lanes16(dots), _mm512_set1_ps(scale));
    store16(scores + s, _mm512_mask_mov_ps(minus_inf, visible_keys(mask, mask_step, s, count), scaled),
            static_cast<int>(count));
  }
}

// outs[g] = sum over keys of weights[g][s] * values[s], divided by totals[g]: each value
// row converted to float once for every query head of the group, kChunks = head_dim / 16
// float vectors per row, kTile heads per pass so the accumulators stay in registers.
template <int kChunks>
void weighted_values(const float* weights, int64_t S, int64_t group, const float* totals,
                     const at::BFloat16* values, int64_t value_row, const bool* mask, int64_t mask_step,
                     at::BFloat16* const* outs) {
  constexpr int kTile = 16 / kChunks;
  for (int64_t g0 = 0; g0 < group; g0 += kTile) {
    const int64_t heads = std::min<int64_t>(kTile, group - g0);
    __m512 acc[kTile][kChunks];
    for (int t = 0; t < kTile; ++t) {
      for (int c = 0; c < kChunks; ++c) acc[t][c] = _mm512_setzero_ps();
    }
    for (int64_t s = 0; s < S; ++s) {
      if (mask != nullptr && !mask[s * mask_step]) continue;  // left padding: weight 0
      __m512 v[kChunks];
      for (int c = 0; c < kChunks; ++c) v[c] = load16(values + s * value_row + 16 * c);
      for (int t = 0; t < kTile; ++t) {
        if (t >= heads) break;
        const __m512 w = _mm512_set1_ps(weights[(g0 + t) * S + s]);
        for (int c = 0; c < kChunks; ++c) acc[t][c] = _mm512_fmadd_ps(w, v[c], acc[t][c]);
      }
    }
    for (int t = 0; t < heads; ++t) {
      const float total = totals[g0 + t];
      const __m512 inverse = _mm512_set1_ps(total > 0.f ? 1.f / total : 0.f);  // no visible key: zeros
      for (int c = 0; c < kChunks; ++c) store16(outs[g0 + t] + 16 * c, _mm512_mul_ps(acc[t][c], inverse));
    }
  }
}

// The `group` query heads that share one kv head, over that head's keys and values.
template <int kHeadDim>
void attend(const at::BFloat16* const* queries, int64_t group, const at::BFloat16* keys, int64_t key_row,
            const at::BFloat16* values, int64_t value_row, const bool* mask, int64_t mask_step, int64_t S,
            float scale, float* scores, float* totals, at::BFloat16* const* outs) {
  for (int64_t g = 0; g < group; ++g) {
    scores_of<kHeadDim / 32>(queries[g], keys, key_row, mask, mask_step, S, scale, scores + g * S);
    totals[g] = softmax_weights(scores + g * S, S);
  }
  weighted_values<kHeadDim / 16>(scores, S, group, totals, values, value_row, mask, mask_step, outs);
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
  // query heads that share them. Each item's keys and values are prefetched while the
  // item before it is computed: one item's work is too short for the hardware
  // prefetcher to get ahead of a new stream (30 layers at 32 rows x 70 keys, cache in
  // memory: 9.1 -> 6.4 ms).
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    auto prefetch_item = [&](int64_t item) {
      prefetch(k.at(item / Hkv, item % Hkv), S * k.row * static_cast<int64_t>(sizeof(at::BFloat16)));
      prefetch(v.at(item / Hkv, item % Hkv), S * v.row * static_cast<int64_t>(sizeof(at::BFloat16)));
    };
    prefetch_item(begin);
    std::vector<float> scores(group * S), totals(group);
    std::vector<const at::BFloat16*> queries(group);
    std::vector<at::BFloat16*> outs(group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, hk = item % Hkv;
      if (item + 1 < end) prefetch_item(item + 1);
      for (int64_t g = 0; g < group; ++g) {
        queries[g] = q.at(b, hk * group + g);
        outs[g] = out_data + (b * H + hk * group + g) * D;
      }
      const bool* row_mask = mask_data != nullptr ? mask_data + b * mask_b : nullptr;
      auto run = D == 64 ? attend<64> : attend<128>;
      run(queries.data(), group, k.at(b, hk), k.row, v.at(b, hk), v.row, row_mask, mask_s, S, scale_f,
          scores.data(), totals.data(), outs.data());
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

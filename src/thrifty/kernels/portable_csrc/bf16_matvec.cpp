// x [n, in] @ W^T for a few rows n (decoding) and a bf16 weight W [out, in], on a CPU
// without native bf16 products (kernels/matmul.py): each weight value is widened to
// float32 in registers (a bf16 is a float32's upper half: a 16-bit shift) and multiplied
// with the float32 input rows there, so the weight streams from memory at 2 bytes a value
// and no float32 copy of it is ever made. PyTorch's own bf16 matmul takes a generic loop
// on such CPUs (16 rows against a [8960, 1536] weight: 53 ms); a float32 copy of every
// weight (the alternative, 5 ms) doubles the model's memory. Sums in float32, rounded
// once to x's dtype, as oneDNN's bf16 kernels round.
#include "portable.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

inline float widen(uint16_t bits) {
  const uint32_t word = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &word, 4);
  return value;
}

inline __m256 widen8(__m128i halves) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}

// The dot products of weight rows w0 and w1 with input rows r0 .. r0 + R - 1
// (R a compile-time count, so the 2 x R accumulators stay in registers; each input load
// serves two weight rows). The weight rows come from memory for the first group of input
// rows and from cache for the others.
template <int R>
inline void bf16_rows(const uint16_t* w0, const uint16_t* w1, const float* xs, int64_t r0, int64_t in_features, float* y0, float* y1) {
  int64_t column = 0;
  float sums[2][R];
#if defined(__AVX2__)
  __m256 acc[2][R];
  for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
  for (; column + 8 <= in_features; column += 8) {
    const __m256 a = widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w0 + column)));
    const __m256 b = widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w1 + column)));
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_loadu_ps(xs + (r0 + r) * in_features + column);
      acc[0][r] = _mm256_fmadd_ps(a, x, acc[0][r]);
      acc[1][r] = _mm256_fmadd_ps(b, x, acc[1][r]);
    }
  }
  for (int k = 0; k < 2; ++k) {
    for (int r = 0; r < R; ++r) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc[k][r]);
      sums[k][r] = 0.0f;
      for (float lane : lanes) sums[k][r] += lane;
    }
  }
#else
  for (int r = 0; r < R; ++r) sums[0][r] = sums[1][r] = 0.0f;
#endif
  for (; column < in_features; ++column) {  // the tail (every column without AVX2)
    const float a = widen(w0[column]), b = widen(w1[column]);
    for (int r = 0; r < R; ++r) {
      const float x = xs[(r0 + r) * in_features + column];
      sums[0][r] += a * x, sums[1][r] += b * x;
    }
  }
  for (int r = 0; r < R; ++r) y0[r] = sums[0][r], y1[r] = sums[1][r];
}

constexpr int64_t ROW_GROUP = 4;

}  // namespace

at::Tensor bf16_matvec(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "bf16_matvec takes x [n, in] and a weight [out, in]");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "bf16_matvec's weight must be a contiguous bfloat16 tensor");
  const int64_t n = x.size(0), in_features = x.size(1), out_features = weight.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({n, out_features}, x.options().dtype(at::kFloat));
  const float* xs = xf.data_ptr<float>();
  const uint16_t* ws = reinterpret_cast<const uint16_t*>(weight.data_ptr<c10::BFloat16>());
  float* ys = out.data_ptr<float>();
  // Pairs of output rows (an odd last row is paired with itself).
  at::parallel_for(0, (out_features + 1) / 2, 8, [&](int64_t begin, int64_t end) {
    float y0[ROW_GROUP], y1[ROW_GROUP];
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t first = 2 * pair, second = std::min(first + 1, out_features - 1);
      const uint16_t* w0 = ws + first * in_features;
      const uint16_t* w1 = ws + second * in_features;
      for (int64_t r0 = 0; r0 < n; r0 += ROW_GROUP) {
        const int64_t group = std::min(ROW_GROUP, n - r0);
        switch (group) {
          case 1: bf16_rows<1>(w0, w1, xs, r0, in_features, y0, y1); break;
          case 2: bf16_rows<2>(w0, w1, xs, r0, in_features, y0, y1); break;
          case 3: bf16_rows<3>(w0, w1, xs, r0, in_features, y0, y1); break;
          default: bf16_rows<4>(w0, w1, xs, r0, in_features, y0, y1); break;
        }
        for (int64_t r = 0; r < group; ++r) {
          ys[(r0 + r) * out_features + first] = y0[r];
          ys[(r0 + r) * out_features + second] = y1[r];
        }
      }
    }
  });
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

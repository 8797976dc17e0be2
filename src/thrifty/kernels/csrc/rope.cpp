// Rotary position embedding (HF's rotate_half layout) forward and backward for bf16.
//
// model.apply_rope is six PyTorch ops (two slices, neg, cat, two products and a sum) per
// tensor, each a pass over memory and, in a decode step, ~60 small op calls per token.
// Here one pass; it rounds where those ops round (each product, then the sum), and
// backward needs only cos and sin, not the input.
#include "native.h"

#if THRIFTY_NATIVE_AVX512
#include <ATen/Parallel.h>

namespace {

using at::BFloat16;

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.dim() == 4 && t.stride(3) == 1 && t.device().is_cpu(), name,
              ": bf16 CPU [B, H, T, D] tensors with a contiguous last dim");
}

// out = x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x[half:], x[:half]);
// `backward` applies the transpose: g * cos + cat(g[half:] * sin[half:], -(g[:half] * sin[:half])).
template <bool backward>
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check(x, "rope");
  check(cos, "rope");
  check(sin, "rope");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && cos.size(2) == T && cos.size(3) == D && sin.sizes() == cos.sizes() &&
                  (cos.size(0) == B || cos.size(0) == 1),
              "rope: cos/sin must be [B or 1, 1, T, D] for x [B, H, T, D]");
  auto out = at::empty({B, H, T, D}, x.options());
  const HeadRows xs(x), cs(cos), ss(sin);
  BFloat16* o = out.data_ptr<BFloat16>();
  at::parallel_for(0, B * H * T, grain_rows(D), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (H * T), h = item / T % H, t = item % T;
      const BFloat16* xr = xs.at(b, h) + t * xs.row;
      const BFloat16* c = cs.at(b, 0) + t * cs.row;
      const BFloat16* s = ss.at(b, 0) + t * ss.row;
      BFloat16* orow = o + item * D;
      for (int64_t j = 0; j < half; j += 16) {
        const int n = static_cast<int>(std::min<int64_t>(16, half - j));
        const __m512 x1 = load16(xr + j, n), x2 = load16(xr + half + j, n);
        const __m512 c1 = load16(c + j, n), c2 = load16(c + half + j, n);
        const __m512 s1 = load16(s + j, n), s2 = load16(s + half + j, n);
        __m512 first, second;
        if (backward) {
          first = _mm512_add_ps(round_bf16(_mm512_mul_ps(x1, c1)), round_bf16(_mm512_mul_ps(x2, s2)));
          second = _mm512_sub_ps(round_bf16(_mm512_mul_ps(x2, c2)), round_bf16(_mm512_mul_ps(x1, s1)));
        } else {
          first = _mm512_sub_ps(round_bf16(_mm512_mul_ps(x1, c1)), round_bf16(_mm512_mul_ps(x2, s1)));
          second = _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, c2)), round_bf16(_mm512_mul_ps(x1, s2)));
        }
        store16(orow + j, first, n);
        store16(orow + half + j, second, n);
      }
    }
  });
  return out;
}

}  // namespace

at::Tensor rope_forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return rope<false>(x, cos, sin);
}

at::Tensor rope_backward(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& sin) {
  return rope<true>(grad, cos, sin);
}

#else

at::Tensor rope_forward(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "rope_forward needs a CPU with AVX-512 BF16");
}
at::Tensor rope_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "rope_backward needs a CPU with AVX-512 BF16");
}

#endif

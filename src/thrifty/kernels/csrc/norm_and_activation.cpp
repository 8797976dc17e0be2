// RMSNorm and SwiGLU forward and backward for bf16 training, one pass over memory each.
//
// elementwise.py's PyTorch versions chain 5-8 elementwise ops (float copies, square, mean,
// multiplies, casts), each a trip through memory: at 4 x 512 tokens of the default model,
// RMSNorm forward+backward took 4.9 ms and SwiGLU 6.5 ms per layer, ~12% of a LoRA SFT
// step. These kernels round where those ops round (to bf16 after the normalisation, after
// silu, after each product), so they agree with the PyTorch versions to a bf16 ulp.
#include "native.h"

#if THRIFTY_NATIVE_AVX512
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>

namespace {

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;

inline __m512 sigmoid(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 e = Vec(_mm512_sub_ps(_mm512_setzero_ps(), x)).exp_u20();
  return _mm512_div_ps(one, _mm512_add_ps(one, e));
}

// Calls f(offset, count) for 16-lane steps over [0, width), the last one partial.
template <typename F>
inline void lanes(int64_t width, F f) {
  for (int64_t j = 0; j < width; j += 16) f(j, static_cast<int>(std::min<int64_t>(16, width - j)));
}

void check_bf16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.device().is_cpu(), name,
              ": contiguous bf16 CPU tensors");
}

}  // namespace

std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_bf16(x, "rms_norm_forward");
  check_bf16(weight, "rms_norm_forward");
  const int64_t width = x.size(-1), rows = x.numel() / width;
  TORCH_CHECK(weight.numel() == width, "rms_norm_forward: weight must have the last dim's size");
  auto out = at::empty_like(x);
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  const BFloat16* xs = x.data_ptr<BFloat16>();
  const BFloat16* w = weight.data_ptr<BFloat16>();
  BFloat16* o = out.data_ptr<BFloat16>();
  float* r = rstd.data_ptr<float>();
  at::parallel_for(0, rows, grain_rows(width), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const BFloat16* row = xs + i * width;
      __m512 sum = _mm512_setzero_ps();
      lanes(width, [&](int64_t j, int n) {
        const __m512 v = load16(row + j, n);
        sum = _mm512_fmadd_ps(v, v, sum);
      });
      const float scale = 1.f / std::sqrt(_mm512_reduce_add_ps(sum) / width + static_cast<float>(eps));
      r[i] = scale;
      const __m512 vs = _mm512_set1_ps(scale);
      lanes(width, [&](int64_t j, int n) {
        const __m512 normed = round_bf16(_mm512_mul_ps(load16(row + j, n), vs));
        store16(o + i * width + j, _mm512_mul_ps(load16(w + j, n), normed), n);
      });
    }
  });
  return {out, rstd};
}

at::Tensor rms_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& rstd) {
  check_bf16(grad, "rms_norm_backward");
  check_bf16(x, "rms_norm_backward");
  check_bf16(weight, "rms_norm_backward");
  const int64_t width = x.size(-1), rows = x.numel() / width;
  const at::Tensor scales = rstd.to(at::kFloat).contiguous();
  TORCH_CHECK(scales.numel() == rows && grad.numel() == x.numel(), "rms_norm_backward: shapes");
  auto grad_x = at::empty_like(x);
  const BFloat16* gs = grad.data_ptr<BFloat16>();
  const BFloat16* xs = x.data_ptr<BFloat16>();
  const BFloat16* w = weight.data_ptr<BFloat16>();
  const float* r = scales.data_ptr<float>();
  BFloat16* out = grad_x.data_ptr<BFloat16>();
  at::parallel_for(0, rows, grain_rows(width), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const BFloat16* g_row = gs + i * width;
      const BFloat16* x_row = xs + i * width;
      const __m512 vs = _mm512_set1_ps(r[i]);
      // d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed)), g = bf16(grad * weight).
      __m512 dot = _mm512_setzero_ps();
      lanes(width, [&](int64_t j, int n) {
        const __m512 g = round_bf16(_mm512_mul_ps(load16(g_row + j, n), load16(w + j, n)));
        dot = _mm512_fmadd_ps(g, _mm512_mul_ps(load16(x_row + j, n), vs), dot);
      });
      const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(dot) / width);
      lanes(width, [&](int64_t j, int n) {
        const __m512 g = round_bf16(_mm512_mul_ps(load16(g_row + j, n), load16(w + j, n)));
        const __m512 normed = _mm512_mul_ps(load16(x_row + j, n), vs);
        store16(out + i * width + j, _mm512_mul_ps(vs, _mm512_fnmadd_ps(normed, mean, g)), n);
      });
    }
  });
  return grad_x;
}

// [rows, width] view of a bf16 CPU tensor whose last dim is contiguous (gate and up of
// a fused gate_up projection are column slices of one matrix).
at::Tensor as_rows(const at::Tensor& t, int64_t width, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.device().is_cpu(), name, ": bf16 CPU tensors");
  at::Tensor rows = t.reshape({-1, width});
  TORCH_CHECK(rows.stride(1) == 1, name, ": the last dim must be contiguous");
  return rows;
}

at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes(), "swiglu_forward: gate and up must have one shape");
  const int64_t width = gate.size(-1);
  const at::Tensor g2 = as_rows(gate, width, "swiglu_forward"), u2 = as_rows(up, width, "swiglu_forward");
  auto out = at::empty(gate.sizes(), gate.options());
  const BFloat16* g = g2.data_ptr<BFloat16>();
  const BFloat16* u = u2.data_ptr<BFloat16>();
  BFloat16* o = out.data_ptr<BFloat16>();
  const int64_t gs = g2.stride(0), us = u2.stride(0);
  at::parallel_for(0, g2.size(0), grain_rows(width), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      lanes(width, [&](int64_t j, int n) {
        const __m512 x = load16(g + i * gs + j, n);
        const __m512 silu = round_bf16(_mm512_mul_ps(x, sigmoid(x)));
        store16(o + i * width + j, _mm512_mul_ps(silu, load16(u + i * us + j, n)), n);
      });
    }
  });
  return out;
}

std::vector<at::Tensor> swiglu_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes() && grad.sizes() == up.sizes(), "swiglu_backward: one shape");
  const int64_t width = gate.size(-1);
  const at::Tensor d2 = as_rows(grad, width, "swiglu_backward"), g2 = as_rows(gate, width, "swiglu_backward"),
                   u2 = as_rows(up, width, "swiglu_backward");
  auto grad_gate = at::empty(gate.sizes(), gate.options()), grad_up = at::empty(up.sizes(), up.options());
  const BFloat16* d = d2.data_ptr<BFloat16>();
  const BFloat16* g = g2.data_ptr<BFloat16>();
  const BFloat16* u = u2.data_ptr<BFloat16>();
  BFloat16* dg = grad_gate.data_ptr<BFloat16>();
  BFloat16* du = grad_up.data_ptr<BFloat16>();
  const int64_t ds = d2.stride(0), gs = g2.stride(0), us = u2.stride(0);
  const __m512 one = _mm512_set1_ps(1.f);
  at::parallel_for(0, g2.size(0), grain_rows(width), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      lanes(width, [&](int64_t j, int n) {
        const __m512 x = load16(g + i * gs + j, n), dy = load16(d + i * ds + j, n);
        const __m512 s = sigmoid(x);
        // silu'(x) = s * (1 + x * (1 - s)), applied to bf16(grad * up) as silu_backward does.
        const __m512 t = round_bf16(_mm512_mul_ps(dy, load16(u + i * us + j, n)));
        const __m512 slope = _mm512_mul_ps(s, _mm512_fmadd_ps(x, _mm512_sub_ps(one, s), one));
        store16(dg + i * width + j, _mm512_mul_ps(t, slope), n);
        store16(du + i * width + j, _mm512_mul_ps(dy, round_bf16(_mm512_mul_ps(x, s))), n);
      });
    }
  });
  return {grad_gate, grad_up};
}

#else

std::vector<at::Tensor> rms_norm_forward(const at::Tensor&, const at::Tensor&, double) {
  TORCH_CHECK(false, "rms_norm_forward needs a CPU with AVX-512 BF16");
}
at::Tensor rms_norm_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "rms_norm_backward needs a CPU with AVX-512 BF16");
}
at::Tensor swiglu_forward(const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "swiglu_forward needs a CPU with AVX-512 BF16");
}
std::vector<at::Tensor> swiglu_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "swiglu_backward needs a CPU with AVX-512 BF16");
}

#endif

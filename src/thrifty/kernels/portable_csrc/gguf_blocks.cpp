// GGUF weight blocks, read where they lie: dequantized row by row inside the matmul
// instead of as a whole bf16 copy of the weight (kernels/gguf_blocks.py says when).
//
// The block layouts and the arithmetic are ggml's (ggml-common.h, dequantize_row_* in
// ggml-quants.c): each value is d * q (- m), with d and m float16 (or 6-bit sub-scales of
// them for the K-quants), computed in float32 in ggml's order.
//
// Dequantizing is plain C++ that g++ -O3 -march=native vectorizes for whatever vector
// unit this CPU has. The decoding matvec dequantizes 32 values at a time into vector
// registers and multiplies them with the float32 input rows there (AVX2's FMA, which
// every x86 CPU with AVX2 or AVX-512 takes; elsewhere a scalar loop), so the weight
// streams from memory at its quantized size. Unlike llama.cpp, which rounds the input
// rows to int8 blocks first (measured here: logits of the default model up to 2.5 apart
// from the float32 model's, greedy answers changed), the input stays float32: the
// results are the dequantized model's, to float32 rounding.
#include "portable.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// ggml's type ids (gguf.GGMLQuantizationType).
enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

struct Layout {
  int64_t values;  // per block
  int64_t bytes;   // per block
};

Layout layout(int64_t qtype) {
  switch (qtype) {
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q5_0: return {32, 22};
    case Q5_1: return {32, 24};
    case Q8_0: return {32, 34};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
  }
  TORCH_CHECK(false, "GGUF block type ", qtype, " is not one Thrifty's kernels read");
}

inline float half(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(bits);
}

// Every block type as one layout: integers q (int8) and, per sub-block of `sub` values, a
// float scale and offset, value = scale * q + offset, computed in float32 as ggml does
// (d * q, d * q + m, (d * sc) * q - dmin * mn). The dequantizer and the dot products
// below read only this form, so each layout is written once.
struct Unpacked {
  int8_t q[256];
  float scale[16];
  float offset[16];
  int sub;    // values per sub-block
  int count;  // sub-blocks
};

inline void unpack_q8_0(const uint8_t* b, Unpacked* u) {
  u->sub = 32, u->count = 1, u->scale[0] = half(b), u->offset[0] = 0.0f;
  std::memcpy(u->q, b + 2, 32);
}

template <bool with_min>
inline void unpack_q4(const uint8_t* b, Unpacked* u) {
  u->sub = 32, u->count = 1, u->scale[0] = half(b), u->offset[0] = with_min ? half(b + 2) : 0.0f;
  const uint8_t* q = b + (with_min ? 4 : 2);
  const int centre = with_min ? 0 : 8;
  for (int i = 0; i < 16; ++i) {
    u->q[i] = static_cast<int8_t>((q[i] & 0x0F) - centre);
    u->q[i + 16] = static_cast<int8_t>((q[i] >> 4) - centre);
  }
}

template <bool with_min>
inline void unpack_q5(const uint8_t* b, Unpacked* u) {
  u->sub = 32, u->count = 1, u->scale[0] = half(b), u->offset[0] = with_min ? half(b + 2) : 0.0f;
  const uint8_t* h = b + (with_min ? 4 : 2);
  uint32_t qh;
  std::memcpy(&qh, h, 4);
  const uint8_t* q = h + 4;
  const int centre = with_min ? 0 : 16;
  for (int j = 0; j < 16; ++j) {
    const int high0 = ((qh >> j) << 4) & 0x10;
    const int high1 = (qh >> (j + 12)) & 0x10;
    u->q[j] = static_cast<int8_t>(((q[j] & 0x0F) | high0) - centre);
    u->q[j + 16] = static_cast<int8_t>(((q[j] >> 4) | high1) - centre);
  }
}

// get_scale_min_k4: the 6-bit scale and min of sub-block j from the 12 packed bytes.
inline void scale_min_k4(int j, const uint8_t* s, int* scale, int* min) {
  if (j < 4) {
    *scale = s[j] & 63;
    *min = s[j + 4] & 63;
  } else {
    *scale = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    *min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

template <bool five_bits>
inline void unpack_k(const uint8_t* b, Unpacked* u) {
  u->sub = 32, u->count = 8;
  const float d = half(b), dmin = half(b + 2);
  for (int j = 0; j < 8; ++j) {
    int sc, mn;
    scale_min_k4(j, b + 4, &sc, &mn);
    u->scale[j] = d * sc;
    u->offset[j] = -(dmin * mn);
  }
  const uint8_t* qh = b + 16;
  const uint8_t* ql = b + (five_bits ? 48 : 16);
  for (int chunk = 0; chunk < 4; ++chunk) {  // 64 values: two sub-blocks of 32
    const int u1 = 1 << (2 * chunk), u2 = 2 << (2 * chunk);
    int8_t* q = u->q + 64 * chunk;
    if (five_bits) {
      for (int l = 0; l < 32; ++l) {
        q[l] = static_cast<int8_t>((ql[l] & 0x0F) + ((qh[l] & u1) ? 16 : 0));
        q[l + 32] = static_cast<int8_t>((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0));
      }
    } else {
      for (int l = 0; l < 32; ++l) {
        q[l] = static_cast<int8_t>(ql[l] & 0x0F);
        q[l + 32] = static_cast<int8_t>(ql[l] >> 4);
      }
    }
    ql += 32;
  }
}

inline void unpack_q6_k(const uint8_t* b, Unpacked* u) {
  u->sub = 16, u->count = 16;
  const float d = half(b + 208);
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  // Sub-block i (16 values) has scale sc[i]: value index 128*h + 32*k + l uses sc[8h + 2k + l/16].
  for (int i = 0; i < 16; ++i) u->scale[i] = d * sc[i], u->offset[i] = 0.0f;
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  for (int h = 0; h < 2; ++h) {
    int8_t* q = u->q + 128 * h;
    for (int l = 0; l < 32; ++l) {
      q[l] = static_cast<int8_t>(((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32);
      q[l + 32] = static_cast<int8_t>(((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32);
      q[l + 64] = static_cast<int8_t>(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
      q[l + 96] = static_cast<int8_t>(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
    }
    ql += 64;
    qh += 32;
  }
}

inline void unpack(const uint8_t* b, int64_t qtype, Unpacked* u) {
  switch (qtype) {
    case Q4_0: unpack_q4<false>(b, u); break;
    case Q4_1: unpack_q4<true>(b, u); break;
    case Q5_0: unpack_q5<false>(b, u); break;
    case Q5_1: unpack_q5<true>(b, u); break;
    case Q8_0: unpack_q8_0(b, u); break;
    case Q4_K: unpack_k<false>(b, u); break;
    case Q5_K: unpack_k<true>(b, u); break;
    case Q6_K: unpack_q6_k(b, u); break;
  }
}

// One row of `in_features` values from its blocks.
void dequantize_row(const uint8_t* row, int64_t qtype, int64_t in_features, float* y) {
  const Layout l = layout(qtype);
  Unpacked u;
  for (int64_t i = 0; i < in_features / l.values; ++i, row += l.bytes, y += l.values) {
    unpack(row, qtype, &u);
    for (int s = 0; s < u.count; ++s) {
      const float scale = u.scale[s], offset = u.offset[s];
      const int8_t* q = u.q + s * u.sub;
      float* ys = y + s * u.sub;
      for (int v = 0; v < u.sub; ++v) ys[v] = scale * q[v] + offset;
    }
  }
}

void check_blocks(const at::Tensor& blocks, int64_t qtype, int64_t in_features) {
  const Layout l = layout(qtype);
  TORCH_CHECK(blocks.dtype() == at::kByte && blocks.dim() == 2 && blocks.is_contiguous(),
              "GGUF blocks must be a contiguous uint8 [rows, bytes per row] tensor");
  TORCH_CHECK(in_features % l.values == 0 && blocks.size(1) == in_features / l.values * l.bytes,
              "GGUF rows of ", in_features, " values take ", in_features / l.values * l.bytes, " bytes, not ",
              blocks.size(1));
}

}  // namespace

// The values of the blocks of each row written into `out` [rows, in_features], float32
// or bfloat16: the caller owns the buffer, so panel after panel reuses one allocation.
void gguf_dequantize(const at::Tensor& blocks, int64_t qtype, at::Tensor& out) {
  const int64_t in_features = out.size(1);
  check_blocks(blocks, qtype, in_features);
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == blocks.size(0),
              "gguf_dequantize writes a contiguous [", blocks.size(0), ", in_features] tensor");
  const int64_t rows = blocks.size(0), row_bytes = blocks.size(1);
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  if (out.scalar_type() == at::kFloat) {
    float* dst = out.data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) dequantize_row(src + r * row_bytes, qtype, in_features, dst + r * in_features);
    });
    return;
  }
  TORCH_CHECK(out.scalar_type() == at::kBFloat16, "gguf_dequantize writes float32 or bfloat16");
  c10::BFloat16* dst = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(in_features);
    for (int64_t r = begin; r < end; ++r) {
      dequantize_row(src + r * row_bytes, qtype, in_features, buffer.data());
      c10::BFloat16* row = dst + r * in_features;
      for (int64_t i = 0; i < in_features; ++i) row[i] = c10::BFloat16(buffer[i]);  // round to nearest even
    }
  });
}

#if defined(__AVX2__)
namespace {

// Q4_K and Q6_K (what a Q4_K_M file is made of) have a faster decoding path: the nibbles
// are unpacked in registers and multiplied with the input rows quantized to int16 in
// blocks of 32 (scale amax / 32767: a value moves by at most 1.5e-5 of its block's
// largest, far below the 2^-9 a bf16 input carries), the products summed exactly in
// int32, 16 pairs per vpmaddwd. (int8 inputs, llama.cpp's choice, moved the default
// model's logits by up to 2.5 and changed greedy answers.)
struct Int16Rows {
  std::vector<int16_t> q;    // [n, in]
  std::vector<float> scale;  // [n, in / 32]
  std::vector<float> sum;    // [n, in / 32]: float sums of x, for the mins
};

Int16Rows int16_rows(const float* x, int64_t n, int64_t in_features) {
  Int16Rows r;
  r.q.resize(n * in_features);
  r.scale.resize(n * in_features / 32);
  r.sum.resize(n * in_features / 32);
  for (int64_t i = 0; i < n * in_features / 32; ++i) {
    const float* v = x + 32 * i;
    float amax = 0.0f, sum = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j])), sum += v[j];
    const float d = amax / 32767.0f, inverse = d > 0.0f ? 1.0f / d : 0.0f;
    r.scale[i] = d;
    r.sum[i] = sum;
    for (int j = 0; j < 32; ++j) r.q[32 * i + j] = static_cast<int16_t>(std::nearbyint(v[j] * inverse));
  }
  return r;
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// sum(w * x) over 16 int16 pairs as 8 int32 lanes.
inline __m256i madd16(__m256i w, const int16_t* x) { return _mm256_madd_epi16(w, load256(x)); }

inline float lane_sum(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  float sum = 0.0f;
  for (float lane : lanes) sum += lane;
  return sum;
}

// The dot products of one weight row with R input rows (R <= ROW_GROUP, a compile-time
// count so that the accumulators stay in registers: kept in memory, each block's sums
// would wait on a store and a load, and the kernel ran at a third of this speed).
constexpr int64_t ROW_GROUP = 4;

// Q4_K: value = (d * sc) * q - dmin * mn, q in 0..15. The mins multiply the input blocks'
// float sums, once per sub-block.
template <int R>
inline void q4_k_row(const uint8_t* b, int64_t blocks, const Int16Rows& rows, int64_t r0, int64_t in_features,
                     float* y) {
  __m256 acc[R][2];
  float offsets[R];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps(), offsets[r] = 0.0f;
  const __m256i low = _mm256_set1_epi8(0x0F);
  const int64_t x_blocks = in_features / 32;
  for (int64_t block = 0; block < blocks; ++block, b += 144) {
    const float d = half(b), dmin = half(b + 2);
    int sc[8], mn[8];
    for (int j = 0; j < 8; ++j) scale_min_k4(j, b + 4, &sc[j], &mn[j]);
    for (int chunk = 0; chunk < 4; ++chunk) {  // 64 values: sub-blocks 2 chunk (low nibbles) and 2 chunk + 1
      const __m256i v = load256(b + 16 + 32 * chunk);
      const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      const __m256i l0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(lo));
      const __m256i l1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(lo, 1));
      const __m256i h0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(hi));
      const __m256i h1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(hi, 1));
      const int64_t column = 256 * block + 64 * chunk;
      const float s_lo = d * sc[2 * chunk], s_hi = d * sc[2 * chunk + 1];
      const float m_lo = dmin * mn[2 * chunk], m_hi = dmin * mn[2 * chunk + 1];
      for (int r = 0; r < R; ++r) {
        const int16_t* x = rows.q.data() + (r0 + r) * in_features + column;
        const int64_t xb = (r0 + r) * x_blocks + column / 32;
        const __m256i p_lo = _mm256_add_epi32(madd16(l0, x), madd16(l1, x + 16));
        const __m256i p_hi = _mm256_add_epi32(madd16(h0, x + 32), madd16(h1, x + 48));
        acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p_lo), _mm256_set1_ps(s_lo * rows.scale[xb]), acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p_hi), _mm256_set1_ps(s_hi * rows.scale[xb + 1]), acc[r][1]);
        offsets[r] -= m_lo * rows.sum[xb] + m_hi * rows.sum[xb + 1];
      }
    }
  }
  for (int r = 0; r < R; ++r) y[r] = lane_sum(_mm256_add_ps(acc[r][0], acc[r][1])) + offsets[r];
}

// Q6_K: value = (d * sc) * (q - 32), sub-blocks of 16.
template <int R>
inline void q6_k_row(const uint8_t* b, int64_t blocks, const Int16Rows& rows, int64_t r0, int64_t in_features,
                     float* y) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x03), centre = _mm256_set1_epi8(32);
  const int64_t x_blocks = in_features / 32;
  for (int64_t block = 0; block < blocks; ++block, b += 210) {
    const float d = half(b + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    for (int h = 0; h < 2; ++h) {  // 128 values each
      const __m256i ql0 = load256(b + 64 * h), ql1 = load256(b + 64 * h + 32), qh = load256(b + 128 + 32 * h);
      __m256i q[4];
      q[0] = _mm256_or_si256(_mm256_and_si256(ql0, low), _mm256_slli_epi16(_mm256_and_si256(qh, two), 4));
      q[1] = _mm256_or_si256(_mm256_and_si256(ql1, low),
                             _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), two), 4));
      q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low),
                             _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), two), 4));
      q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low),
                             _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), two), 4));
      for (int k = 0; k < 4; ++k) {  // values 128 h + 32 k + l, scales sc[8 h + 2 k] (l < 16) and the next
        const __m256i centred = _mm256_sub_epi8(q[k], centre);
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(centred));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(centred, 1));
        const int64_t column = 256 * block + 128 * h + 32 * k;
        const float s0 = d * sc[8 * h + 2 * k], s1 = d * sc[8 * h + 2 * k + 1];
        for (int r = 0; r < R; ++r) {
          const int16_t* x = rows.q.data() + (r0 + r) * in_features + column;
          const float dx = rows.scale[(r0 + r) * x_blocks + column / 32];
          acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(madd16(w0, x)), _mm256_set1_ps(s0 * dx), acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(madd16(w1, x + 16)), _mm256_set1_ps(s1 * dx), acc[r][1]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) y[r] = lane_sum(_mm256_add_ps(acc[r][0], acc[r][1]));
}

template <int R>
inline void k_quant_row(const uint8_t* row, int64_t blocks, int64_t qtype, const Int16Rows& rows, int64_t r0,
                        int64_t in_features, float* y) {
  if (qtype == Q4_K) {
    q4_k_row<R>(row, blocks, rows, r0, in_features, y);
  } else {
    q6_k_row<R>(row, blocks, rows, r0, in_features, y);
  }
}

at::Tensor k_quant_matvec(const float* xs, int64_t n, int64_t in_features, const at::Tensor& blocks, int64_t qtype,
                          at::Tensor out) {
  const Int16Rows rows = int16_rows(xs, n, in_features);
  const int64_t out_features = blocks.size(0), row_bytes = blocks.size(1), per_row = in_features / 256;
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  float* ys = out.data_ptr<float>();
  at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
    float y[ROW_GROUP];
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* row = src + o * row_bytes;  // read from memory once, from cache for later groups
      for (int64_t r0 = 0; r0 < n; r0 += ROW_GROUP) {
        const int64_t group = std::min(ROW_GROUP, n - r0);
        switch (group) {
          case 1: k_quant_row<1>(row, per_row, qtype, rows, r0, in_features, y); break;
          case 2: k_quant_row<2>(row, per_row, qtype, rows, r0, in_features, y); break;
          case 3: k_quant_row<3>(row, per_row, qtype, rows, r0, in_features, y); break;
          default: k_quant_row<4>(row, per_row, qtype, rows, r0, in_features, y); break;
        }
        for (int64_t r = 0; r < group; ++r) ys[(r0 + r) * out_features + o] = y[r];
      }
    }
  });
  return out;
}

}  // namespace
#endif

// x [n, in_features] @ W^T for a few rows n (decoding), W [out, in] in GGUF blocks, never
// dequantized into memory: each weight block is unpacked once, and each piece of 32
// values is dequantized in registers (scale * q + offset, one rounding) and multiplied
// with every input row. Summed in float32, rounded once to x's dtype.
at::Tensor gguf_matvec(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype) {
  TORCH_CHECK(x.dim() == 2, "gguf_matvec takes x [rows, in_features]");
  const int64_t n = x.size(0), in_features = x.size(1), out_features = blocks.size(0);
  check_blocks(blocks, qtype, in_features);
  const Layout l = layout(qtype);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({n, out_features}, x.options().dtype(at::kFloat));
  const float* xs = xf.data_ptr<float>();
#if defined(__AVX2__)
  if (qtype == Q4_K || qtype == Q6_K) {
    k_quant_matvec(xs, n, in_features, blocks, qtype, out);
    return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
  }
#endif
  float* ys = out.data_ptr<float>();
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  const int64_t row_bytes = blocks.size(1), per_row = in_features / l.values;
  at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
    Unpacked u;
#if defined(__AVX2__)
    std::vector<__m256> acc(n);
#else
    std::vector<float> acc(n);
#endif
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t r = 0; r < n; ++r) {
#if defined(__AVX2__)
        acc[r] = _mm256_setzero_ps();
#else
        acc[r] = 0.0f;
#endif
      }
      const uint8_t* row = src + o * row_bytes;
      for (int64_t b = 0; b < per_row; ++b, row += l.bytes) {
        unpack(row, qtype, &u);
        for (int c = 0; c < l.values / 32; ++c) {  // pieces of 32 values
          const int8_t* q = u.q + 32 * c;
          const int64_t column = b * l.values + 32 * c;
#if defined(__AVX2__)
          __m256 w[4];
          for (int k = 0; k < 4; ++k) {  // 8 values each; a sub-block of Q6_K is 16 values
            const int s = (32 * c + 8 * k) / u.sub;
            const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * k));
            const __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
            w[k] = _mm256_fmadd_ps(qf, _mm256_set1_ps(u.scale[s]), _mm256_set1_ps(u.offset[s]));
          }
          for (int64_t r = 0; r < n; ++r) {
            const float* xr = xs + r * in_features + column;
            __m256 a = acc[r];
            for (int k = 0; k < 4; ++k) a = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(xr + 8 * k), a);
            acc[r] = a;
          }
#else
          float w[32];
          for (int v = 0; v < 32; ++v) {
            const int s = (32 * c + v) / u.sub;
            w[v] = std::fma(float(q[v]), u.scale[s], u.offset[s]);
          }
          for (int64_t r = 0; r < n; ++r) {
            const float* xr = xs + r * in_features + column;
            for (int v = 0; v < 32; ++v) acc[r] += w[v] * xr[v];
          }
#endif
        }
      }
      for (int64_t r = 0; r < n; ++r) {
#if defined(__AVX2__)
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, acc[r]);
        float sum = 0.0f;
        for (float lane : lanes) sum += lane;
#else
        const float sum = acc[r];
#endif
        ys[r * out_features + o] = sum;
      }
    }
  });
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

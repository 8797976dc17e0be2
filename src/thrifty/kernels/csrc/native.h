// The functions of Thrifty's native module (module.cpp binds them for Python).
//
// Compiled on the user's machine by thrifty/kernels/native.py with -march=native. The
// kernels use AVX-512 with BF16 instructions; on any other CPU they compile to stubs
// and `avx512_bf16()` tells Python to use PyTorch's ops instead.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define THRIFTY_NATIVE_AVX512 1
#include <immintrin.h>

// Round-to-nearest-even float -> bf16 of 16 lanes.
inline __m256i to_bf16(__m512 x) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)); }

// 16 lanes of float from float or bf16 memory and back; with `count` < 16, only the
// first `count` elements are read or written.
inline __m512 load16(const float* p, int count = 16) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), p);
}
inline __m512 load16(const at::BFloat16* p, int count = 16) {
  const __m256i raw = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << count) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store16(float* p, __m512 x, int count = 16) {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << count) - 1), x);
}
inline void store16(at::BFloat16* p, __m512 x, int count = 16) {
  _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << count) - 1), to_bf16(x));
}
// Ask for `bytes` from `data` to be in cache soon: the hardware prefetcher does not get
// ahead of streams that are short or start often (decoding's weights and KV cache).
inline void prefetch(const void* data, int64_t bytes) {
  const char* start = static_cast<const char*>(data);
  for (int64_t offset = 0; offset < bytes; offset += 64) _mm_prefetch(start + offset, _MM_HINT_T0);
}
// What a bf16 tensor op stores: x rounded to bf16, as float again.
inline __m512 round_bf16(__m512 x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(x)), 16));
}

// A bf16 [B, H, T, D] tensor with a contiguous last dim: the start of each (batch,
// head) and the row stride. A batch dim of 1 broadcasts (cos/sin tables).
struct HeadRows {
  const at::BFloat16* data;
  int64_t batch, head, row;
  explicit HeadRows(const at::Tensor& t)
      : data(t.data_ptr<at::BFloat16>()), batch(t.size(0) == 1 ? 0 : t.stride(0)), head(t.stride(1)),
        row(t.stride(2)) {}
  const at::BFloat16* at(int64_t b, int64_t h) const { return data + b * batch + h * head; }
};

// Whether kernels may use AMX where the CPU has it: THRIFTY_NATIVE_AMX=0 runs their
// AVX-512 BF16 versions instead (the tests check those on AMX machines this way).
inline bool amx_allowed() {
  static const bool allowed = [] {
    const char* value = std::getenv("THRIFTY_NATIVE_AMX");
    return value == nullptr || std::string(value) != "0";
  }();
  return allowed;
}
#else
#define THRIFTY_NATIVE_AVX512 0
#endif

#if THRIFTY_NATIVE_AVX512 && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define THRIFTY_NATIVE_AMX 1
#else
#define THRIFTY_NATIVE_AMX 0
#endif

#if THRIFTY_NATIVE_AVX512
// The bf16 matmuls (vnni_gemm.h, decode_linear.cpp) read B in VNNI-2 layout: element
// (k, n) of a [K, N] matrix sits at ((k / 2) * N + n) * 2 + k % 2. This packs X^T for a
// row-major X [N, K]: element (k, n) of X^T is X[n][k]; rows of X at or past `rows` are
// zero. The pair (X[n][k], X[n][k + 1]) is one 32-bit word of row n, so each VNNI row is
// a 32-bit gather down the rows, 16 at a time. Row stride and K even, N a multiple of 16.
inline void pack_vnni_transposed(const at::BFloat16* src, int64_t row_stride, int64_t rows, int64_t K,
                                 int64_t N, at::BFloat16* out) {
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const int* words = reinterpret_cast<const int*>(src);
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    const __mmask16 valid = _mm512_cmplt_epi32_mask(_mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(n0))),
                                                     _mm512_set1_epi32(static_cast<int>(rows)));
    const __m512i row_words = _mm512_mullo_epi32(_mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(n0))),
                                                 _mm512_set1_epi32(static_cast<int>(row_stride / 2)));
    for (int64_t k2 = 0; k2 < K / 2; ++k2) {
      const __m512i index = _mm512_add_epi32(row_words, _mm512_set1_epi32(static_cast<int>(k2)));
      _mm512_storeu_si512(out + (k2 * N + n0) * 2,
                          _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, index, words, 4));
    }
  }
}
#endif

// at::parallel_for grain for rows of `row_elements` values: work under ~32k values runs
// on the calling thread, where waking the second one would cost more than it saves
// (decoding steps call these kernels on [32, 576] tensors).
inline int64_t grain_rows(int64_t row_elements) { return row_elements >= (1 << 15) ? 1 : (1 << 15) / row_elements; }

// attention_backward.cpp
std::vector<at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& query,
                                           const at::Tensor& key, const at::Tensor& value,
                                           const at::Tensor& out, const at::Tensor& logsumexp,
                                           const c10::optional<at::Tensor>& mask, bool causal,
                                           double scale);
// Whether the attention kernels' matmuls run on AMX (oneDNN's brgemm) or AVX-512 BF16.
bool attention_uses_amx();

// attention_forward.cpp: (out [B, H, T, D] bf16, logsumexp [B, H, T] float) as
// attention_backward takes them; the same arguments as it.
std::vector<at::Tensor> attention_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                          const c10::optional<at::Tensor>& mask, bool causal, double scale);

// token_log_probs.cpp
at::Tensor token_log_probs(at::Tensor logits, const at::Tensor& targets, double temperature,
                           const c10::optional<at::Tensor>& grad_scale);

// norm_and_activation.cpp: bf16 [rows, width] contiguous tensors, weight [width].
std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor rms_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& rstd);
at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up);
std::vector<at::Tensor> swiglu_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up);

// rope.cpp: x [B, H, T, D] (last dim contiguous), cos/sin [B or 1, 1, T, D]; all bf16.
at::Tensor rope_forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor rope_backward(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& sin);

// decode_linear.cpp: bf16 linear layers for a few dozen rows (token generation), on AMX
// or AVX-512 BF16.
bool decode_linear_uses_amx();
at::Tensor decode_linear_pack(const at::Tensor& weight);
// decode_lora_pack: a group's LoRA branches, float A^T [in, sum(ranks)] stacked and
// block-diagonal scaled B^T [sum(ranks), sum(sizes)] (rank 0: a layer without one) ->
// the operands decode_linear takes as `lora` (empty: no LoRA).
std::vector<at::Tensor> decode_lora_pack(const at::Tensor& a_t, const at::Tensor& bt, const std::vector<int64_t>& ranks,
                                         const std::vector<int64_t>& sizes);
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                         const c10::optional<at::Tensor>& bias, const std::vector<at::Tensor>& lora);

// decode_attention.cpp: one query per row ([B, H, 1, D]) over cached keys/values.
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const c10::optional<at::Tensor>& mask, double scale);
bool decode_attention_supports(int64_t head_dim);

// decoding_step.cpp: every decoder layer of one decoding step, as a sequence of the
// kernels above. A fused group of linear layers, packed by decode_*_pack:
struct DecodeLinear {
  at::Tensor packed;
  int64_t out_features;
  c10::optional<at::Tensor> bias;
  std::vector<at::Tensor> lora;
  at::Tensor operator()(const at::Tensor& x) const;
};
struct DecodingLayer {
  at::Tensor input_norm, post_attention_norm;
  DecodeLinear qkv, o, gate_up, down;
};
struct DecodingLayers {
  std::vector<DecodingLayer> layers;
  int64_t heads, kv_heads, head_dim;
  double eps;
  // The hidden states [rows, hidden] after the last layer (before the final norm) for
  // the step's input embeddings; writes this step's keys and values at `length` in the
  // per-layer caches [rows, kv_heads, max_length, head_dim].
  at::Tensor step(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                  const c10::optional<at::Tensor>& mask, const std::vector<at::Tensor>& keys,
                  const std::vector<at::Tensor>& values, int64_t length) const;
};

// sampling.cpp: one token per row from softmax(logits / temperature); uniform [rows].
at::Tensor sample_tokens(const at::Tensor& logits, const at::Tensor& uniform, double temperature);

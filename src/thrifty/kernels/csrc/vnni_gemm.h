// Small bf16 matmuls with float accumulation: C (+)= A B with A bf16 [M, K] row-major,
// B bf16 [K, N] in VNNI-2 layout (native.h's pack_vnni_transposed, attention_blocks.h's
// pack_vnni) and C float [M, N].
//
// `gemm`, the attention kernels' matmul, runs oneDNN's brgemm micro-kernel (ATen's
// cpublas) on CPUs with AMX. Its bf16 brgemm runs on AMX only: on AVX-512 BF16 CPUs
// without it (AMD Zen 4 and 5, Intel Cooper Lake) the attention kernels had fallen back
// to PyTorch's flash attention, which visits every key block up to the last visible
// one: 74% of a GRPO update at 4 x 4 x 128 there. `avx512_gemm` is the same product
// with vdpbf16ps, register-blocked 4 rows x 64 columns: every k-pair loads 4 B vectors
// and 4 broadcast A pairs for 16 dot products. decode_linear.cpp calls it directly
// where there is no AMX.
#pragma once

#include "native.h"

#if THRIFTY_NATIVE_AVX512
#include <ATen/native/CPUBlas.h>

#include <cstdint>
#include <cstring>

namespace vnni_gemm {

namespace detail {

inline const at::BFloat16* advanced(const at::BFloat16* next, int64_t elements) {
  return next == nullptr ? nullptr : next + elements;
}

// Rows [0, MR) x columns [0, 16 NV) of C, over all K. `next` (or null): a matrix laid
// out as B, read after it, whose same lines are prefetched as B's are read.
template <int MR, int NV>
inline void tile(int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, const at::BFloat16* A,
                 const at::BFloat16* B, float* C, const at::BFloat16* next) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = add ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; k += 2) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) {
      const int64_t offset = ((k / 2) * ldb + 16 * v) * 2;
      b[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(B + offset));
      if (next != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next + offset), _MM_HINT_T0);
    }
    for (int r = 0; r < MR; ++r) {
      int32_t pair;  // A[r, k] and A[r, k + 1], as one 32-bit lane
      std::memcpy(&pair, A + r * lda + k, sizeof(pair));
      const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, acc[r][v]);
  }
}

// Rows [0, MR) of C, all N columns: tiles NV vectors wide, then narrower ones for the rest.
template <int MR, int NV>
inline void columns(int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, const at::BFloat16* A,
                    const at::BFloat16* B, float* C, const at::BFloat16* next) {
  int64_t n = 0;
  for (; n + 16 * NV <= N; n += 16 * NV) {
    tile<MR, NV>(K, lda, ldb, ldc, add, A, B + 2 * n, C + n, advanced(next, 2 * n));
  }
  if constexpr (NV > 1) {
    if (n < N) columns<MR, NV - 1>(N - n, K, lda, ldb, ldc, add, A, B + 2 * n, C + n, advanced(next, 2 * n));
  }
}

// All of C: MR rows per pass over B, then the rows left one at a time.
template <int MR, int NV>
inline void rows(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                 const at::BFloat16* A, const at::BFloat16* B, float* C, const at::BFloat16* next) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) columns<MR, NV>(N, K, lda, ldb, ldc, add, A + m * lda, B, C + m * ldc, next);
  for (; m < M; ++m) columns<1, NV>(N, K, lda, ldb, ldc, add, A + m * lda, B, C + m * ldc, next);
}

}  // namespace detail

// brgemm's arguments and meaning, for N a multiple of 16 and K even. Up to 32 columns
// (decode_linear.cpp's blocks), 8 rows per pass over B: 16 accumulators either way.
//
// next: where the caller reads its next B from memory (or null). Its lines are
// prefetched as B's are read, so a stream of cold matrices keeps loading during the
// passes over B that hit the cache. decode_linear's weights, 30 layers' gate/up at 16
// rows: 3.8-4.6 ms -> 3.2-3.3 ms (27-33 GB/s; a plain read gets ~39 here).
inline void avx512_gemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                        const at::BFloat16* A, const at::BFloat16* B, float* C, const at::BFloat16* next = nullptr) {
  if (N <= 32) {
    detail::rows<8, 2>(M, N, K, lda, ldb, ldc, add, A, B, C, next);
  } else {
    detail::rows<4, 4>(M, N, K, lda, ldb, ldc, add, A, B, C, next);
  }
}

// Whether oneDNN's bf16 brgemm runs here (it needs AMX) and may; asked once per process.
inline bool amx_brgemm() {
  static const bool available = amx_allowed() && at::native::cpublas::could_pack(at::kBFloat16);
  return available;
}

// C[M, N] (+ C when add) = A[M, K] B[K, N]: lda, ldb, ldc are row pitches in elements
// (ldb of B's VNNI rows, in pairs). N a multiple of 16, K even.
inline void gemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                 const at::BFloat16* A, const at::BFloat16* B, float* C) {
  if (amx_brgemm()) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C);
  } else {
    avx512_gemm(M, N, K, lda, ldb, ldc, add, A, B, C);
  }
}

// Called by each thread after its last gemm (oneDNN's AMX tile state).
inline void release() {
  if (amx_brgemm()) at::native::cpublas::brgemm_release();
}

}  // namespace vnni_gemm

#endif

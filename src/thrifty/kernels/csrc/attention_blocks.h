// Blocks of 64 queries and keys for the attention kernels (attention_backward.cpp,
// attention_forward.cpp): which key blocks a query block sees at all, packing for
// their matmuls (vnni_gemm.h), and the per-key mask test.
#pragma once

#include "native.h"
#include "vnni_gemm.h"

#if THRIFTY_NATIVE_AVX512
#include <algorithm>
#include <cstdint>
#include <vector>

namespace attention_blocks {

// Query rows per block; key counts are rounded up to it so every matmul's K is even.
constexpr int64_t kBlock = 64;

// Pairs (a[n], b[n]) as 32-bit lanes: two rows of a VNNI-2 block.
inline __m512i interleave(__m256i a, __m256i b) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

// The matmuls read B in VNNI-2 layout: element (k, n) of a [K, N] matrix sits at
// ((k / 2) * ld + n) * 2 + k % 2. Rows at or past `rows` are zero. N a multiple of 16.
inline void pack_vnni(const at::BFloat16* src, int64_t row_stride, int64_t rows, int64_t K, int64_t N,
                      at::BFloat16* out) {
  for (int64_t k = 0; k < K; k += 2) {
    at::BFloat16* dst = out + (k / 2) * N * 2;
    const at::BFloat16* r0 = src + k * row_stride;
    const __mmask16 has0 = k < rows ? 0xFFFF : 0, has1 = k + 1 < rows ? 0xFFFF : 0;
    for (int64_t n = 0; n < N; n += 16) {
      const __m256i a = _mm256_maskz_loadu_epi16(has0, r0 + n), b = _mm256_maskz_loadu_epi16(has1, r0 + row_stride + n);
      _mm512_storeu_si512(dst + 2 * n, interleave(a, b));
    }
  }
}

inline void copy_rows(const at::BFloat16* src, int64_t row_stride, int64_t rows, int64_t total_rows,
                      int64_t width, at::BFloat16* out) {
  for (int64_t r = 0; r < total_rows; ++r) {
    if (r < rows) {
      std::copy(src + r * row_stride, src + r * row_stride + width, out + r * width);
    } else {
      std::fill(out + r * width, out + (r + 1) * width, at::BFloat16(0.f));
    }
  }
}

// The boolean mask as [B, 1, T, S] with contiguous rows (an undefined tensor without one).
inline at::Tensor mask_rows(const c10::optional<at::Tensor>& mask, int64_t B, int64_t T, int64_t S) {
  if (!mask.has_value()) return at::Tensor();
  at::Tensor rows = mask->to(at::kBool).expand({B, 1, T, S});
  return rows.stride(3) == 1 ? rows : rows.contiguous();
}

// Which of keys j..j+15 a row attends: below `limit` (its causal or padded end; 0 for a
// padding row) and True in its mask row (`mask` may be null). Reads no mask byte at or
// past `limit`.
inline __mmask16 attended(int64_t limit, const bool* mask, int64_t j) {
  const int64_t left = limit - j;
  __mmask16 allowed = left <= 0 ? 0 : left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
  if (mask != nullptr && allowed) {
    const __m128i m = _mm_maskz_loadu_epi8(allowed, mask + j);
    allowed &= _mm_test_epi8_mask(m, m);
  }
  return allowed;
}

// Which blocks of kBlock keys each block of kBlock queries sees at all: [batches, query
// blocks, key blocks], 1 where some query of the block may attend to some key of it.
// A GRPO row ([prompt | completion 1 | completion 2 | ...]) lets each completion see the
// prompt and itself only, so most blocks of a late completion's rows are hidden; the
// table is built once per call (a scan of the mask, ~T * S bytes per batch element) and
// shared by all heads.
inline std::vector<uint8_t> visible_key_blocks(const bool* mask, int64_t mask_b, int64_t mask_row, int64_t batches,
                                               int64_t T, int64_t S, bool causal) {
  const int64_t nq = (T + kBlock - 1) / kBlock, nk = (S + kBlock - 1) / kBlock;
  std::vector<uint8_t> visible(batches * nq * nk, 0);
  for (int64_t b = 0; b < batches; ++b) {
    for (int64_t qb = 0; qb < nq; ++qb) {
      uint8_t* row_blocks = visible.data() + (b * nq + qb) * nk;
      const int64_t i0 = qb * kBlock, rows = std::min(kBlock, T - i0);
      if (mask == nullptr) {  // causal: up to the diagonal; otherwise everything
        const int64_t keys = causal ? std::min(S, i0 + rows) : S;
        std::fill(row_blocks, row_blocks + (keys + kBlock - 1) / kBlock, uint8_t(1));
        continue;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const bool* m = mask + b * mask_b + (i0 + r) * mask_row;
        for (int64_t kb = 0; kb < nk; ++kb) {
          if (row_blocks[kb]) continue;
          const int64_t width = std::min(kBlock, S - kb * kBlock);
          const __m512i bytes = _mm512_maskz_loadu_epi8(width == 64 ? ~0ull : (1ull << width) - 1, m + kb * kBlock);
          row_blocks[kb] = _mm512_test_epi8_mask(bytes, bytes) != 0;
        }
      }
    }
  }
  return visible;
}

// Consecutive visible key blocks: keys [key, key + count) (count a multiple of kBlock),
// whose scores are columns [column, column + count) of the compacted score block. Each
// run is one matmul call per product; calls have a fixed cost, so runs, not blocks.
struct KeyRun {
  int64_t key, count, column;
};

// The runs of one query block's row of the table; returns the compacted width.
inline int64_t key_runs(const uint8_t* visible, int64_t nk, std::vector<KeyRun>& runs) {
  runs.clear();
  int64_t width = 0;
  for (int64_t kb = 0; kb < nk; ++kb) {
    if (!visible[kb]) continue;
    if (!runs.empty() && runs.back().key + runs.back().count == kb * kBlock) {
      runs.back().count += kBlock;
    } else {
      runs.push_back({kb * kBlock, kBlock, width});
    }
    width += kBlock;
  }
  return width;
}

// The table for one call: per batch element, or one for all when the mask broadcasts
// over the batch (or there is none).
class KeyBlockTable {
 public:
  // mask: bool [B, 1, T, S] with batch stride mask_b (0 when broadcast) and row stride
  // mask_row, or null: then causal (or everything visible).
  KeyBlockTable(const bool* mask, int64_t mask_b, int64_t mask_row, int64_t B, int64_t T, int64_t S, bool causal)
      : nq_((T + kBlock - 1) / kBlock), nk_((S + kBlock - 1) / kBlock), per_batch_(mask != nullptr && mask_b != 0),
        visible_(visible_key_blocks(mask, mask_b, mask_row, per_batch_ ? B : 1, T, S, causal)) {}

  // The runs of visible keys of batch element b's query block starting at query i0;
  // returns their total width (0: the block sees nothing).
  int64_t runs(int64_t b, int64_t i0, std::vector<KeyRun>& out) const {
    return key_runs(visible_.data() + ((per_batch_ ? b : 0) * nq_ + i0 / kBlock) * nk_, nk_, out);
  }

 private:
  int64_t nq_, nk_;
  bool per_batch_;
  std::vector<uint8_t> visible_;
};

}  // namespace attention_blocks

#endif

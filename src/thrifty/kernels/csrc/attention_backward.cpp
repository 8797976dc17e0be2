// Backward pass of softmax attention for bf16 on x86 CPUs with AVX-512 BF16.
//
// PyTorch's CPU flash-attention backward was ~25% of a LoRA SFT step (7x its own
// forward). This one recomputes the probabilities per block of 64 queries from the
// forward's logsumexp, like flash attention, but runs all five products through
// bf16 matmuls with float accumulation (vnni_gemm.h: AMX or AVX-512 BF16), skips
// key blocks a causal or explicit mask hides, and does the softmax-gradient arithmetic
// in 16-lane vectors. Measured at 4 x 512 tokens, 9 query / 3 kv heads of 64: 17-20 ms
// against 50-56 ms for PyTorch's, and its key/value gradients are closer to a float32
// reference (accumulated in float across the whole sequence).
//
// Key blocks are skipped by a table of which 64-key blocks each 64-query block sees at
// all (built once per call from the mask), not just past the last visible key: a GRPO
// row ([prompt | completion 1 | completion 2 | ...], grpo/batches.py) lets a completion
// see the prompt and itself only, so a late completion's block used to run through every
// other completion's keys. Runs of consecutive visible blocks go to the matmul as one
// call each. At the GRPO benchmark shape (4 x 576 tokens: a 38-token prompt and 8
// completions of ~60; 9 / 3 heads of 64) 98 of the 180 causal blocks are visible:
// ~10 ms against ~19 ms before (medians of 30-40 interleaved calls, 1.9x in every run
// on a machine shared with other work; it includes vectorising the q / dO block
// transposes and rowsum(dO * O), which perf showed at ~40% of the kernel's own time).
// Causal 4 x 512: 1.2-1.5x from those alone.
//
#include "native.h"
#include "attention_blocks.h"

#if THRIFTY_NATIVE_AVX512
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;
using namespace attention_blocks;

// X^T [D, kBlock] of a bf16 block X [kBlock, D] (D a multiple of 16). Rows 2p and 2p+1
// paired into 32-bit lanes (x[2p][c], x[2p+1][c]) are elements 2p, 2p+1 of row c of X^T,
// so a 32-bit gather per 16 pairs builds each row. The scalar loop it replaced, with the
// scalar delta, took ~40% of the kernel's own time (perf) at the GRPO shape.
void transpose_block(const BFloat16* src, int64_t D, uint32_t* pairs, BFloat16* out) {
  for (int64_t p = 0; p < kBlock / 2; ++p) {
    const BFloat16* r0 = src + 2 * p * D;
    for (int64_t c = 0; c < D; c += 16) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + c));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + D + c));
      _mm512_storeu_si512(pairs + p * D + c, interleave(a, b));
    }
  }
  const __m512i lanes = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(static_cast<int>(D)));
  for (int64_t c = 0; c < D; ++c) {
    for (int64_t p0 = 0; p0 < kBlock / 2; p0 += 16) {
      const __m512i index = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(p0 * D + c)));
      _mm512_storeu_si512(out + c * kBlock + 2 * p0, _mm512_i32gather_epi32(index, pairs, 4));
    }
  }
}

// Dot product of two bf16 rows of D values (a multiple of 16) in float.
inline float dot(const BFloat16* a, const BFloat16* b, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += 16) acc = _mm512_fmadd_ps(load16(a + c), load16(b + c), acc);
  return _mm512_reduce_add_ps(acc);
}

struct Row {
  const float* scores;  // this row of the score block: compacted columns
  const float* grad_p;
  int64_t limit;      // keys [0, limit) may be attended; 0 for padding rows
  float lse, delta;
  const bool* mask;   // this row of the mask, or null
};

// Softmax probabilities of keys j..j+15 (0 where not attended) and their dS; the keys'
// scores sit at `column` of the compacted score block.
inline void probabilities(const Row& row, int64_t j, int64_t column, float scale, __m512& p, __m512& ds) {
  const __mmask16 allowed = attended(row.limit, row.mask, j);
  if (!allowed) {
    p = ds = _mm512_setzero_ps();
    return;
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 x = _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(row.scores + column), vscale), _mm512_set1_ps(row.lse));
  p = _mm512_maskz_mov_ps(allowed, __m512(Vec(x).exp_u20()));
  ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(row.grad_p + column), _mm512_set1_ps(row.delta))), vscale);
}

}  // namespace

// grad_out, query, out: [B, H, T, D]; key, value: [B, Hkv, S, D] (H a multiple of Hkv);
// logsumexp: [B, H, T] float of the scaled, masked scores; mask: optional bool
// [B or 1, 1, T, S], True where a query may attend; otherwise causal when `causal`.
// Returns grad_query [B, H, T, D] bf16 and, per query head and part of its query blocks,
// float grad_key and grad_value transposed and padded: [B, H * parts, D, S rounded up to
// 64] (the caller sums each kv head's query heads and parts, and transposes back).
std::vector<at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& query,
                                           const at::Tensor& key, const at::Tensor& value,
                                           const at::Tensor& out, const at::Tensor& logsumexp,
                                           const c10::optional<at::Tensor>& mask, bool causal,
                                           double scale_) {
  for (const at::Tensor* t : {&grad_out, &query, &key, &value, &out}) {
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->dim() == 4 && t->stride(3) == 1,
                "attention_backward: bf16 [B, H, T, D] tensors with a contiguous last dim");
  }
  const int64_t B = query.size(0), H = query.size(1), T = query.size(2), D = query.size(3);
  const int64_t Hkv = key.size(1), S = key.size(2);
  const int64_t group = H / Hkv;
  TORCH_CHECK(D % 16 == 0 && H % Hkv == 0,
              "attention_backward: head_dim a multiple of 16, whole groups of query heads per kv head");
  TORCH_CHECK(!causal || T == S, "attention_backward: causal needs as many queries as keys");
  TORCH_CHECK(key.stride(2) % 2 == 0 && value.stride(2) % 2 == 0,
              "attention_backward: keys and values with an even row stride (read as bf16 pairs)");
  const float scale = static_cast<float>(scale_);
  const at::Tensor lse = logsumexp.to(at::kFloat);
  const bool has_mask = mask.has_value();
  const at::Tensor mask_t = mask_rows(mask, B, T, S);
  const int64_t Sp = (S + kBlock - 1) / kBlock * kBlock;

  // Work items are (batch, head, part of the query blocks), about 4 per thread: GRPO
  // packs its groups into a few long rows, and B * H alone would leave threads idle.
  // Each part accumulates its own grad_key / grad_value.
  const int64_t nq = (T + kBlock - 1) / kBlock;
  const int64_t parts = std::clamp<int64_t>((4 * at::get_num_threads() + B * H - 1) / (B * H), 1, nq);
  auto grad_query = at::empty({B, H, T, D}, query.options());
  auto grad_key = at::empty({B, H * parts, D, Sp}, query.options().dtype(at::kFloat));
  auto grad_value = at::empty({B, H * parts, D, Sp}, query.options().dtype(at::kFloat));

  const HeadRows q(query), k(key), v(value), o(out), go(grad_out);
  const float* lse_data = lse.data_ptr<float>();
  const int64_t lse_b = lse.stride(0), lse_h = lse.stride(1), lse_t = lse.stride(2);
  const bool* mask_data = has_mask ? mask_t.data_ptr<bool>() : nullptr;
  const int64_t mask_b = has_mask ? mask_t.stride(0) : 0, mask_row = has_mask ? mask_t.stride(2) : 0;
  BFloat16* gq_data = grad_query.data_ptr<BFloat16>();
  float* gk_data = grad_key.data_ptr<float>();
  float* gv_data = grad_value.data_ptr<float>();

  const KeyBlockTable table(mask_data, mask_b, mask_row, B, T, S, causal);

  at::parallel_for(0, B * H * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<BFloat16> key_t(D * Sp), value_t(D * Sp), key_v(Sp * D);
    std::vector<BFloat16> q_rows(kBlock * D), q_t(D * kBlock), go_rows(kBlock * D), go_t(D * kBlock);
    std::vector<float> scores(kBlock * Sp), grad_p(kBlock * Sp), grad_q(kBlock * D), delta(kBlock);
    std::vector<BFloat16> ds(kBlock * Sp), ds_v(kBlock * Sp), p_v(kBlock * Sp);
    std::vector<uint32_t> pairs(kBlock / 2 * D);
    std::vector<KeyRun> runs;
    int64_t packed = -1;  // the (batch, kv head) whose keys and values are packed
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (H * parts), h = item / parts % H, hk = h / group, part = item % parts;
      if (b * Hkv + hk != packed) {  // consecutive items share their kv head
        pack_vnni_transposed(k.at(b, hk), k.row, S, D, Sp, key_t.data());
        pack_vnni_transposed(v.at(b, hk), v.row, S, D, Sp, value_t.data());
        pack_vnni(k.at(b, hk), k.row, S, Sp, D, key_v.data());
        packed = b * Hkv + hk;
      }
      float* gk_t = gk_data + ((b * H + h) * parts + part) * D * Sp;
      float* gv_t = gv_data + ((b * H + h) * parts + part) * D * Sp;
      std::fill(gk_t, gk_t + D * Sp, 0.f);  // zeroed here, while the thread's cache wants it
      std::fill(gv_t, gv_t + D * Sp, 0.f);  // (columns of hidden key blocks stay 0)

      for (int64_t i0 = part * nq / parts * kBlock; i0 < std::min(T, (part + 1) * nq / parts * kBlock); i0 += kBlock) {
        const int64_t rows = std::min(kBlock, T - i0);
        // Only the key blocks this block sees, compacted: e columns in runs.
        const int64_t e = table.runs(b, i0, runs);
        BFloat16* gq = gq_data + ((b * H + h) * T + i0) * D;
        if (e == 0) {
          std::fill(gq, gq + rows * D, BFloat16(0.f));
          continue;
        }

        copy_rows(q.at(b, h) + i0 * q.row, q.row, rows, kBlock, D, q_rows.data());
        copy_rows(go.at(b, h) + i0 * go.row, go.row, rows, kBlock, D, go_rows.data());
        transpose_block(q_rows.data(), D, pairs.data(), q_t.data());
        transpose_block(go_rows.data(), D, pairs.data(), go_t.data());
        for (int64_t r = 0; r < kBlock; ++r) {
          delta[r] = r < rows ? dot(o.at(b, h) + (i0 + r) * o.row, go_rows.data() + r * D, D) : 0.f;
        }

        // scores = q k^T, grad_p = dO v^T: [kBlock, e] in float. Column n of the packed
        // K^T / V^T starts at element 2 n (VNNI pairs), row pitch Sp.
        for (const KeyRun& run : runs) {
          vnni_gemm::gemm(kBlock, run.count, D, D, Sp, e, false, q_rows.data(), key_t.data() + 2 * run.key,
                          scores.data() + run.column);
          vnni_gemm::gemm(kBlock, run.count, D, D, Sp, e, false, go_rows.data(), value_t.data() + 2 * run.key,
                          grad_p.data() + run.column);
        }

        // Probabilities P and dS = P * (dP - delta) * scale, two rows at a time so that
        // both can be written interleaved: the VNNI layout the matmuls read B in.
        for (int64_t r = 0; r < kBlock; r += 2) {
          Row row[2];
          for (int64_t x = 0; x < 2; ++x) {
            const int64_t i = i0 + r + x;
            Row& w = row[x];
            w.scores = scores.data() + (r + x) * e;
            w.grad_p = grad_p.data() + (r + x) * e;
            w.limit = r + x >= rows ? 0 : (causal ? std::min(S, i + 1) : S);
            w.lse = w.limit ? lse_data[b * lse_b + h * lse_h + i * lse_t] : 0.f;
            w.delta = delta[r + x];
            w.mask = has_mask && w.limit ? mask_data + b * mask_b + i * mask_row : nullptr;
          }
          for (const KeyRun& run : runs) {
            for (int64_t j = 0; j < run.count; j += 16) {
              const int64_t c = run.column + j;
              __m512 p[2], g[2];
              for (int x = 0; x < 2; ++x) probabilities(row[x], run.key + j, c, scale, p[x], g[x]);
              const __m256i p0 = to_bf16(p[0]), p1 = to_bf16(p[1]), g0 = to_bf16(g[0]), g1 = to_bf16(g[1]);
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(ds.data() + r * e + c), g0);
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(ds.data() + (r + 1) * e + c), g1);
              _mm512_storeu_si512(ds_v.data() + (r * e + 2 * c), interleave(g0, g1));
              _mm512_storeu_si512(p_v.data() + (r * e + 2 * c), interleave(p0, p1));
            }
          }
        }

        // grad_q = dS k; grad_k^T += q^T dS; grad_v^T += dO^T P. Run by run: dS's columns
        // at run.column, K's VNNI rows (pairs of keys, D wide) at run.key * D, and the
        // compacted VNNI dS / P columns at 2 * run.column, row pitch e.
        for (size_t n = 0; n < runs.size(); ++n) {
          const KeyRun& run = runs[n];
          vnni_gemm::gemm(kBlock, D, run.count, e, D, D, n > 0, ds.data() + run.column, key_v.data() + run.key * D,
                          grad_q.data());
          vnni_gemm::gemm(D, run.count, kBlock, kBlock, e, Sp, true, q_t.data(), ds_v.data() + 2 * run.column,
                          gk_t + run.key);
          vnni_gemm::gemm(D, run.count, kBlock, kBlock, e, Sp, true, go_t.data(), p_v.data() + 2 * run.column,
                          gv_t + run.key);
        }
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < D; c += 16) store16(gq + r * D + c, load16(grad_q.data() + r * D + c));
        }
      }
    }
    vnni_gemm::release();
  });
  return {grad_query, grad_key, grad_value};
}

bool attention_uses_amx() { return vnni_gemm::amx_brgemm(); }

#else

bool attention_uses_amx() { return false; }

std::vector<at::Tensor> attention_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const c10::optional<at::Tensor>&, bool, double) {
  TORCH_CHECK(false, "attention_backward needs a CPU with AVX-512 BF16");
}

#endif

"""llama.cpp's K-quant block formats (Q4_K, Q5_K, Q6_K), quantized as its reference
quantizers do (ggml-quants.c, `quantize_row_q{4,5,6}_K_ref`, no importance matrix).

The `gguf` package dequantizes these types but cannot write them. Each function here takes
float32 rows [n, k] (k a multiple of 256) and returns the blocks' bytes [n, k / 256 * size]
in llama.cpp's layout. The search for scales runs over all blocks at once, one element
position at a time, so every float32 sum is accumulated in the reference's order.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
F32 = np.float32


def nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (x + 1.5 * 2^23 in float32): round half to even."""
    return np.rint(x.astype(F32)).astype(np.int32)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


# ---------------------------------------------------------------- Q6_K


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) over blocks x [B, n]:
    (scale [B], L [B, n] in 0..2*nmax-1)."""
    blocks, n = x.shape
    index = np.abs(x).argmax(axis=1)  # the first largest |x|, as the reference's strict '>'
    amax = np.abs(x)[np.arange(blocks), index]
    max_value = x[np.arange(blocks), index]
    zero = amax < F32(1e-15)  # GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1), max_value).astype(F32)
    weights = (x * x).astype(F32)

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        levels = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        sumlx = np.zeros(blocks, F32)
        suml2 = np.zeros(blocks, F32)
        for i in range(n):  # the reference's order of accumulation
            l_i = levels[:, i].astype(F32)
            sumlx = (sumlx + weights[:, i] * x[:, i] * l_i).astype(F32)
            suml2 = (suml2 + weights[:, i] * l_i * l_i).astype(F32)
        return levels, sumlx, suml2

    iscale = (F32(-nmax) / safe_max).astype(F32)
    levels, sumlx, suml2 = fit(iscale)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F32(1)), F32(0)).astype(F32)
    best = (scale * sumlx).astype(F32)
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = (-(F32(nmax) + F32(0.1) * F32(step)) / safe_max).astype(F32)
        trial, sumlx, suml2 = fit(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = np.where(better[:, None], trial, levels)
        scale = np.where(better, sumlx / np.where(suml2 > 0, suml2, F32(1)), scale).astype(F32)
        best = np.where(better, scale * sumlx, best).astype(F32)
    scale = np.where(zero, F32(0), scale)
    levels = np.where(zero[:, None], 0, levels + nmax)
    return scale.astype(F32), levels.astype(np.int32)


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(F32).reshape(-1, QK_K)
    blocks = x.shape[0]
    scales, first_levels = _make_qx_quants(x.reshape(-1, 16), 32)
    scales, first_levels = scales.reshape(blocks, 16), first_levels.reshape(blocks, 16, 16)
    index = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(blocks), index]
    empty = np.abs(max_scale) < F32(1e-15)
    iscale = (F32(-128) / np.where(empty, F32(1), max_scale)).astype(F32)
    d = _f16(F32(1) / iscale)
    d = np.where(empty, np.float16(0), d)
    block_scales = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
    block_scales = np.where(empty[:, None], 0, block_scales).astype(np.int8)
    step = (d.astype(F32)[:, None] * block_scales.astype(F32)).astype(F32)  # [B, 16]
    xs = x.reshape(blocks, 16, 16)
    safe = np.where(step == 0, F32(1), step)
    levels = np.clip(nearest_int(xs / safe[:, :, None]), -32, 31) + 32
    # A zero scale skips the sub-block: it keeps make_qx_quants's levels (an empty block: zeros).
    levels = np.where((step == 0)[:, :, None], first_levels, levels)
    levels = np.where(empty[:, None, None], 0, levels).reshape(blocks, QK_K)
    ql = np.zeros((blocks, 128), np.uint8)
    qh = np.zeros((blocks, 64), np.uint8)
    for half in range(2):
        part = levels[:, 128 * half:128 * (half + 1)]
        q = [part[:, 32 * k:32 * (k + 1)] for k in range(4)]
        ql[:, 64 * half:64 * half + 32] = (q[0] & 0xF) | ((q[2] & 0xF) << 4)
        ql[:, 64 * half + 32:64 * half + 64] = (q[1] & 0xF) | ((q[3] & 0xF) << 4)
        qh[:, 32 * half:32 * half + 32] = (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6)
    out = np.concatenate([ql, qh, block_scales.view(np.uint8), d.reshape(-1, 1).view(np.uint8)], axis=1)
    return out.reshape(rows.shape[0], -1)


# ---------------------------------------------------------------- Q4_K, Q5_K


def _make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float,
                      nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta=0.1, nstep,
    use_mad=false) over blocks [B, n]: (scale [B], the_min [B], L [B, n])."""
    blocks, n = x.shape
    low = np.minimum(x.min(axis=1), F32(0)).astype(F32)
    high = x.max(axis=1).astype(F32)
    sum_w = weights[:, 0].copy()
    sum_x = (sum_w * x[:, 0]).astype(F32)
    for i in range(1, n):
        sum_w = (sum_w + weights[:, i]).astype(F32)
        sum_x = (sum_x + weights[:, i] * x[:, i]).astype(F32)
    flat = high == low
    span = np.where(flat, F32(1), high - low).astype(F32)
    iscale = (F32(nmax) / span).astype(F32)
    scale = (F32(1) / iscale).astype(F32)
    minimum = low.copy()
    levels = np.clip(nearest_int(iscale[:, None] * (x - low[:, None])), 0, nmax)
    best_error = np.zeros(blocks, F32)
    for i in range(n):
        diff = (scale * levels[:, i].astype(F32) + minimum - x[:, i]).astype(F32)
        best_error = (best_error + weights[:, i] * (diff * diff)).astype(F32)
    for step in range(nstep + 1):
        # The reference updates `min` when a step improves the fit, and the later steps
        # measure from it (both the span and the offset).
        span = np.where(flat, F32(1), high - minimum).astype(F32)
        iscale = ((F32(rmin) + F32(0.1) * F32(step) + F32(nmax)) / span).astype(F32)
        trial = np.clip(nearest_int(iscale[:, None] * (x - minimum[:, None])), 0, nmax)
        sum_l = np.zeros(blocks, F32)
        sum_l2 = np.zeros(blocks, F32)
        sum_xl = np.zeros(blocks, F32)
        for i in range(n):
            w, level = weights[:, i], trial[:, i].astype(F32)
            sum_l = (sum_l + w * level).astype(F32)
            sum_l2 = (sum_l2 + w * level * level).astype(F32)
            sum_xl = (sum_xl + w * level * x[:, i]).astype(F32)
        det = (sum_w * sum_l2 - sum_l * sum_l).astype(F32)
        ok = det > 0
        safe_det = np.where(ok, det, F32(1))
        this_scale = ((sum_w * sum_xl - sum_x * sum_l) / safe_det).astype(F32)
        this_min = ((sum_l2 * sum_x - sum_l * sum_xl) / safe_det).astype(F32)
        positive = this_min > 0
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 != 0, sum_l2, F32(1)), this_scale).astype(F32)
        this_min = np.where(positive, F32(0), this_min).astype(F32)
        error = np.zeros(blocks, F32)
        for i in range(n):
            diff = (this_scale * trial[:, i].astype(F32) + this_min - x[:, i]).astype(F32)
            error = (error + weights[:, i] * (diff * diff)).astype(F32)
        better = ok & (error < best_error) & ~flat  # a flat block returns before this search
        best_error = np.where(better, error, best_error)
        scale = np.where(better, this_scale, scale)
        minimum = np.where(better, this_min, minimum)
        levels = np.where(better[:, None], trial, levels)
    scale = np.where(flat, F32(0), scale).astype(F32)
    levels = np.where(flat[:, None], 0, levels)
    return scale, (-minimum).astype(F32), levels


def _k_scales(x: np.ndarray, nmax: int, rmin: float,
              nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per super-block: d, dmin (f16), the packed 12 scale bytes, and the levels [B, 256]."""
    blocks = x.shape[0]
    sub = x.reshape(blocks * 8, 32)
    sum_x2 = np.zeros(sub.shape[0], F32)
    for i in range(32):
        sum_x2 = (sum_x2 + sub[:, i] * sub[:, i]).astype(F32)
    av_x = np.sqrt(sum_x2 / F32(32)).astype(F32)
    weights = (av_x[:, None] + np.abs(sub)).astype(F32)
    scales, mins, first_levels = _make_qkx2_quants(sub, weights, nmax, rmin, nstep)
    scales, mins = scales.reshape(blocks, 8), mins.reshape(blocks, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0)).astype(F32)
    inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0)).astype(F32)
    # The reference stores nearest_int's result in a uint8 before MIN(63, .): wrapped, not clamped.
    ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales).astype(np.uint8)).astype(np.uint8)
    lm = np.minimum(63, nearest_int(inv_min[:, None] * mins).astype(np.uint8)).astype(np.uint8)
    packed = np.zeros((blocks, 12), np.uint8)
    packed[:, 0:4], packed[:, 4:8] = ls[:, :4], lm[:, :4]
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    packed[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    packed[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    d = _f16(max_scale / F32(63))
    dmin = _f16(max_min / F32(63))
    step = (d.astype(F32)[:, None] * ls.astype(F32)).astype(F32)
    offset = (dmin.astype(F32)[:, None] * lm.astype(F32)).astype(F32)
    xs = x.reshape(blocks, 8, 32)
    safe = np.where(step == 0, F32(1), step)
    levels = np.clip(nearest_int((xs + offset[:, :, None]) / safe[:, :, None]), 0, nmax)
    # A zero scale skips the sub-block: it keeps make_qkx2_quants's levels.
    levels = np.where((step == 0)[:, :, None], first_levels.reshape(blocks, 8, 32), levels).reshape(blocks, QK_K)
    return d, dmin, packed, levels


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(F32).reshape(-1, QK_K)
    d, dmin, packed, levels = _k_scales(x, 15, rmin=-1.0, nstep=20)
    qs = np.concatenate([(levels[:, j:j + 32] | (levels[:, j + 32:j + 64] << 4)) for j in range(0, QK_K, 64)],
                        axis=1).astype(np.uint8)
    out = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), packed, qs], axis=1)
    return out.reshape(rows.shape[0], -1)


def quantize_q5_k(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(F32).reshape(-1, QK_K)
    d, dmin, packed, levels = _k_scales(x, 31, rmin=-0.5, nstep=15)
    qh = np.zeros((x.shape[0], 32), np.uint8)
    qs = []
    for n, j in enumerate(range(0, QK_K, 64)):
        low, high = levels[:, j:j + 32], levels[:, j + 32:j + 64]
        qh |= ((low > 15).astype(np.uint8) << (2 * n)) | ((high > 15).astype(np.uint8) << (2 * n + 1))
        qs.append(((low & 0xF) | ((high & 0xF) << 4)).astype(np.uint8))
    out = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), packed, qh, *qs],
                         axis=1)
    return out.reshape(rows.shape[0], -1)

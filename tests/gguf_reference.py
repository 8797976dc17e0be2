"""GGUF block layouts written from ggml's own definitions (ggml-common.h and the
dequantize_row_* functions of ggml-quants.c), independent of the `gguf` package and of
Thrifty's kernels: the float64 reference the loader and the block kernels are tested
against, and random blocks with random (finite) scales to test them on."""

from __future__ import annotations

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
# Block size in values and bytes, and the byte offsets of its float16 scale fields.
BLOCKS = {Q.Q8_0: (32, 34, (0,)), Q.Q4_0: (32, 18, (0,)), Q.Q4_1: (32, 20, (0, 2)), Q.Q5_0: (32, 22, (0,)),
          Q.Q5_1: (32, 24, (0, 2)), Q.Q4_K: (256, 144, (0, 2)), Q.Q5_K: (256, 176, (0, 2)), Q.Q6_K: (256, 210, (208,))}


def f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    return blocks[:, offset:offset + 2].copy().view(np.float16).astype(np.float64)[:, 0]


def nibbles(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (q & 0x0F).astype(np.int32), (q >> 4).astype(np.int32)


def k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7: 6-bit scales and mins packed in 12 bytes."""
    s = scales.astype(np.int32)
    sc, mn = np.empty((len(s), 8), np.int32), np.empty((len(s), 8), np.int32)
    for j in range(8):
        if j < 4:
            sc[:, j], mn[:, j] = s[:, j] & 63, s[:, j + 4] & 63
        else:
            sc[:, j] = (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4)
            mn[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
    return sc, mn


def dequantize(raw: np.ndarray, qtype: Q, magnitude: bool = False) -> np.ndarray:
    """One row-major float64 vector from the blocks of `raw` (uint8): every value exact
    (a float16 scale times a small integer, minus a float16 min times another).

    magnitude=True: instead the sum of its terms' absolute values, |scale * q| + |min|, the
    size float32 rounding errors of computing the value scale with."""
    size, nbytes, _ = BLOCKS[qtype]
    b = raw.reshape(-1, nbytes)
    a = np.abs if magnitude else (lambda v: v)
    sign = 1.0 if magnitude else -1.0  # the min term: subtracted, or its size added
    d = a(f16(b, 208 if qtype == Q.Q6_K else 0)[:, None])
    if qtype == Q.Q8_0:
        return (d * a(b[:, 2:].view(np.int8).astype(np.float64))).reshape(-1)
    if qtype in (Q.Q4_0, Q.Q4_1):
        lo, hi = nibbles(b[:, 2 if qtype == Q.Q4_0 else 4:])
        q = np.concatenate([lo, hi], axis=1).astype(np.float64)
        return (d * a(q - 8) if qtype == Q.Q4_0 else d * q + a(f16(b, 2)[:, None])).reshape(-1)
    if qtype in (Q.Q5_0, Q.Q5_1):
        start = 2 if qtype == Q.Q5_0 else 4
        qh = b[:, start:start + 4].copy().view(np.uint32)[:, 0].astype(np.int64)[:, None]
        lo, hi = nibbles(b[:, start + 4:])
        j = np.arange(16)[None, :]
        q = np.concatenate([lo | (((qh >> j) << 4) & 0x10), hi | ((qh >> (j + 12)) & 0x10)], axis=1)
        q = q.astype(np.float64)
        return (d * a(q - 16) if qtype == Q.Q5_0 else d * q + a(f16(b, 2)[:, None])).reshape(-1)
    if qtype in (Q.Q4_K, Q.Q5_K):
        dmin = a(f16(b, 2)[:, None])
        sc, mn = k_scales(b[:, 4:16])
        qh = b[:, 16:48].astype(np.int32) if qtype == Q.Q5_K else None
        qs = b[:, 48:] if qtype == Q.Q5_K else b[:, 16:]
        out = []
        for chunk in range(4):  # 64 values each: two sub-blocks of 32
            lo, hi = nibbles(qs[:, 32 * chunk:32 * chunk + 32])
            if qh is not None:
                lo = lo + np.where(qh & (1 << (2 * chunk)), 16, 0)
                hi = hi + np.where(qh & (2 << (2 * chunk)), 16, 0)
            for sub, q in ((2 * chunk, lo), (2 * chunk + 1, hi)):
                out.append((d * sc[:, sub:sub + 1]) * q.astype(np.float64) + sign * dmin * mn[:, sub:sub + 1])
        return np.concatenate(out, axis=1).reshape(-1)
    # Q6_K: ql[128], qh[64], scales[16] (int8), d
    ql, qh, scales = b[:, :128].astype(np.int32), b[:, 128:192].astype(np.int32), b[:, 192:208].view(np.int8)
    y = np.empty((len(b), 256), np.float64)
    for half in range(2):
        l_, h_, s_ = ql[:, 64 * half:64 * half + 64], qh[:, 32 * half:32 * half + 32], scales[:, 8 * half:8 * half + 8]
        for l in range(32):
            i = l // 16
            q1 = ((l_[:, l] & 0xF) | ((h_[:, l] & 3) << 4)) - 32
            q2 = ((l_[:, l + 32] & 0xF) | (((h_[:, l] >> 2) & 3) << 4)) - 32
            q3 = ((l_[:, l] >> 4) | (((h_[:, l] >> 4) & 3) << 4)) - 32
            q4 = ((l_[:, l + 32] >> 4) | (((h_[:, l] >> 6) & 3) << 4)) - 32
            for k, q in enumerate((q1, q2, q3, q4)):
                y[:, 128 * half + 32 * k + l] = d[:, 0] * a(s_[:, i + 2 * k].astype(np.float64) * q)
    return y.reshape(-1)


def random_blocks(qtype: Q, values: int, rng: np.random.Generator, scale: float = 0.05) -> np.ndarray:
    """Random bytes, with finite float16 scales of either sign up to `scale` (real files
    hold ~1e-3..1e-1; float16's extremes, 6e-5 to 65504, test the arithmetic's range)."""
    size, nbytes, scale_offsets = BLOCKS[qtype]
    blocks = rng.integers(0, 256, (values // size, nbytes), dtype=np.uint8)
    for offset in scale_offsets:
        blocks[:, offset:offset + 2] = rng.uniform(-scale, scale, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks



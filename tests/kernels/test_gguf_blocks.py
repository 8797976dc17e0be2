"""The GGUF block kernels (kernels/gguf_blocks.py, portable_csrc/gguf_blocks.cpp) against
float64 on random blocks of every type: random bytes, random scales of either sign,
typical and extreme; row counts that do not divide the threads' shares; a few input rows
(the dequantize-and-dot kernel) and many (dequantized panels through oneDNN). The bounds
are float32's rounding (u = 2^-24) of the operations each path performs, so a wrong
nibble, scale, sign or block offset (errors of the size of the values) fails them.
The kernels are one C++ source that g++ vectorizes for the CPU at hand (AVX2 or
AVX-512): these tests check the build of the machine they run on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thrifty.kernels import gguf_blocks
from thrifty.kernels.native import native_kernel
from thrifty.layers.gguf_quant import GGUFEmbedding, GGUFLinear

from gguf_reference import BLOCKS, Q, dequantize, random_blocks

U = 2.0**-24
TYPES = sorted(BLOCKS, key=int)


def needs_kernels() -> None:
    if native_kernel("gguf_blocks") is None:
        pytest.fail("the GGUF block kernels did not build on this machine (g++ and torch's headers are needed)")


def weight(qtype: Q, rows: int, in_features: int, seed: int, scale: float = 0.05) -> tuple[torch.Tensor, np.ndarray,
                                                                                           np.ndarray]:
    """(blocks [rows, bytes], float64 values [rows, in], float64 term magnitudes [rows, in])."""
    rng = np.random.default_rng(seed)
    raw = random_blocks(qtype, rows * in_features, rng, scale)
    blocks = torch.from_numpy(raw.reshape(rows, -1).copy())
    values = dequantize(raw, qtype).reshape(rows, in_features)
    magnitude = dequantize(raw, qtype, magnitude=True).reshape(rows, in_features)
    return blocks, values, magnitude


def in_features_for(qtype: Q) -> int:
    return 3 * BLOCKS[qtype][0] if BLOCKS[qtype][0] == 256 else 7 * BLOCKS[qtype][0]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("scale", [0.05, 1e-4, 6e4])  # typical; float16 subnormal scales; near float16's max
def test_dequantize_is_float32_of_the_exact_values(qtype: Q, scale: float) -> None:
    needs_kernels()
    in_features = in_features_for(qtype)
    blocks, exact, magnitude = weight(qtype, 37, in_features, seed=int(qtype), scale=scale)
    got = gguf_blocks.dequantize(blocks, int(qtype), in_features, torch.float32).double().numpy()
    # ggml computes scale * q (- min) in float32: at most three roundings of terms of size `magnitude`.
    assert (np.abs(got - exact) <= 3 * U * magnitude + 1e-45).all(), np.abs(got - exact).max()
    bf16 = gguf_blocks.dequantize(blocks, int(qtype), in_features, torch.bfloat16)
    assert torch.equal(bf16, torch.from_numpy(got).float().bfloat16())  # one rounding of the float32 value


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, 6, 16, 100])  # the matvec kernel (groups of 4 rows and a remainder); then panels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_and_input_grad_against_float64(qtype: Q, rows: int, dtype: torch.dtype) -> None:
    needs_kernels()
    in_features, out_features = in_features_for(qtype), 37 + (gguf_blocks.PANEL_ROWS if rows > 16 else 0)
    blocks, w, magnitude = weight(qtype, out_features, in_features, seed=rows + int(qtype))
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    x64 = x.double().numpy()
    exact = x64 @ w.T
    got = gguf_blocks.matmul(x, blocks, int(qtype), in_features)
    assert got.shape == (rows, out_features) and got.dtype == dtype
    size = np.abs(x64) @ np.abs(w).T  # sum |x w|: what the sum's roundings scale with
    if rows <= gguf_blocks.MATVEC_ROWS and qtype in (Q.Q4_K, Q.Q6_K):
        # Q4_K / Q6_K decode with x quantized to int16 in blocks of 32 (scale amax / 32767:
        # each value off by at most half a step), exact integer sums, then float32 scaling
        # and sums over blocks (roundings of terms of size |scale q x| + |offset x|).
        step = np.repeat(np.abs(x64).reshape(rows, -1, 32).max(axis=2) / 32767, 32, axis=1)
        bound = (0.5 + 1e-3) * step @ np.abs(w).T + U * (in_features / 8 + 32) * (np.abs(x64) @ magnitude.T)
        if dtype == torch.bfloat16:
            bound = bound + 2.0**-8 * np.abs(exact)  # half a bf16 ulp
    elif dtype == torch.float32 or rows <= gguf_blocks.MATVEC_ROWS:
        # float32 sums (8 lanes, each summing in_features / 8 terms, then the lanes added;
        # or a float32 GEMM on float32 panels) of values computed in float32 (at most three
        # roundings of terms of size `magnitude`), rounded once to dtype.
        bound = U * (3 * (np.abs(x64) @ magnitude.T) + (in_features / 8 + 16) * size)
        if dtype == torch.bfloat16:
            bound = bound + 2.0**-8 * np.abs(exact)  # half a bf16 ulp
    else:  # bf16 panels through oneDNN: each weight rounded to bf16, float32 accumulation, bf16 result
        bound = 2.0**-8 * size + 2.0**-8 * np.abs(exact)
    error = np.abs(got.double().numpy() - exact)
    assert (error <= bound).all(), (error / np.maximum(bound, 1e-30)).max()

    grad = torch.randn(rows, out_features, generator=g).to(dtype)
    exact_grad = grad.double().numpy() @ w
    got_grad = gguf_blocks.input_grad(grad, blocks, int(qtype), in_features)
    size = np.abs(grad.double().numpy()) @ np.abs(w)
    bound = (U * (out_features + 3) * size if dtype == torch.float32
             else 2.0**-8 * size + 2.0**-8 * np.abs(exact_grad))
    error = np.abs(got_grad.double().numpy() - exact_grad)
    assert (error <= bound).all(), (error / np.maximum(bound, 1e-30)).max()


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q4_1], ids=lambda t: t.name)
def test_numpys_dequantizer_stands_in_where_the_kernels_do_not_run(qtype: Q, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    in_features = in_features_for(qtype)
    blocks, exact, magnitude = weight(qtype, 9, in_features, seed=5)
    x = torch.randn(2, in_features, generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("THRIFTY_NATIVE_OFF", "gguf_blocks")
    got = gguf_blocks.dequantize(blocks, int(qtype), in_features, torch.float32).double().numpy()
    assert (np.abs(got - exact) <= 3 * U * magnitude + 1e-45).all()
    fallback = gguf_blocks.matmul(x, blocks, int(qtype), in_features)
    torch.testing.assert_close(fallback.double(), torch.from_numpy(x.double().numpy() @ exact.T), rtol=1e-5,
                               atol=1e-5)


def test_the_layers_train_adapters_through_the_blocks() -> None:
    """GGUFLinear under autograd: the gradient of its input is grad @ W, from the blocks
    again (nothing dequantized is kept for backward); GGUFEmbedding looks rows up."""
    needs_kernels()
    in_features = 512
    blocks, w, _ = weight(Q.Q4_K, 64, in_features, seed=3)
    layer = GGUFLinear(blocks, int(Q.Q4_K), in_features, torch.full((64,), 0.5), torch.float32)
    x = torch.randn(40, in_features, dtype=torch.float32, requires_grad=True)
    y = layer(x)
    x64 = x.detach().double().numpy()
    bound = U * (in_features + 3) * (np.abs(x64) @ np.abs(w).T) + 1e-6  # float32 sums, as above
    assert (np.abs(y.detach().double().numpy() - (x64 @ w.T + 0.5)) <= bound).all()
    y.sum().backward()
    bound = U * (64 + 3) * (np.ones((40, 64)) @ np.abs(w))
    assert (np.abs(x.grad.double().numpy() - np.ones((40, 64)) @ w) <= bound).all()
    embedding = GGUFEmbedding(blocks, int(Q.Q4_K), in_features, torch.float32)
    ids = torch.tensor([[3, 0], [63, 3]])
    torch.testing.assert_close(embedding(ids).double(), torch.from_numpy(w[ids.numpy()]), rtol=0, atol=3e-7)

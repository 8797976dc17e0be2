"""kernels/portable_csrc/bf16_matvec.cpp (decoding products with bf16 weights where the CPU
has no native bf16 products) against float64 on random shapes: column tails that are not
whole vectors, odd output counts (a row paired with itself), every row-group remainder,
weights spanning bf16's exponent range (subnormals to 2^100), and non-finite values."""

from __future__ import annotations

import pytest
import torch

from thrifty.kernels.native import native_kernel

U = 2.0**-24  # float32's unit roundoff


@pytest.fixture(scope="module")
def kernel():  # type: ignore[no-untyped-def]
    module = native_kernel("bf16_matvec")
    if module is None:
        pytest.fail("the portable kernels did not build (they need only g++): see the warning above")
    return module


def wide_range(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """bf16 values of random sign with exponents from 2^-133 (subnormal) to 2^100."""
    exponent = torch.randint(-133, 100, shape, generator=g).double()
    return (torch.randn(shape, generator=g, dtype=torch.float64).sign() * 2.0**exponent
            * (1 + torch.rand(shape, generator=g, dtype=torch.float64))).bfloat16()


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_random_shapes_against_float64(kernel, seed: int, x_dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    rows = [1, 2, 3, 4, 5, 16, 64, 70][seed % 8]
    in_features = [1, 7, 8, 15, 16, 17, 200, 1536][(seed * 3) % 8]
    out_features = [1, 2, 7, 33, 64][seed % 5]
    weight = (wide_range((out_features, in_features), g) if seed % 3 == 0
              else torch.randn(out_features, in_features, generator=g).bfloat16())
    x = (torch.randn(rows, in_features, generator=g) * (2.0**-80 if seed % 3 == 0 else 1.0)).to(x_dtype)
    got = kernel.bf16_matvec(x, weight)
    assert got.shape == (rows, out_features) and got.dtype == x_dtype
    exact = x.double() @ weight.double().t()
    size = x.double().abs() @ weight.double().abs().t()
    # float32 sums over 8 lanes (each in_features / 8 terms, then the lanes added), one
    # rounding per product; bf16 output: half its ulp more. A weight read as its neighbour
    # column, a dropped tail or a swapped output pair is off by ~size, far beyond this.
    bound = U * (in_features / 8 + 16) * size + (2.0**-8 * exact.abs() if x_dtype == torch.bfloat16 else 0)
    error = (got.double() - exact).abs()
    assert (error <= bound + 1e-300).all(), (error / bound.clamp_min(1e-300)).max()


def test_non_finite_weights_and_inputs_propagate(kernel) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 40, generator=g).bfloat16()
    weight[1, 3], weight[3, 39] = float("nan"), float("inf")  # a vector lane and the tail
    x = torch.rand(3, 40, generator=g) + 0.5  # positive: inf * x stays +inf
    x[2, 10] = float("nan")
    got = kernel.bf16_matvec(x, weight)
    assert got[:2, 1].isnan().all() and (got[:2, 3] == float("inf")).all()
    assert got[2].isnan().all()  # a NaN input reaches every output of its row
    finite = [0, 2, 4]
    assert torch.isfinite(got[:2, finite]).all()


def test_refuses_a_weight_that_is_not_contiguous_bf16(kernel) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="contiguous bfloat16"):
        kernel.bf16_matvec(x, torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="contiguous bfloat16"):
        kernel.bf16_matvec(x, torch.randn(8, 4).bfloat16().t())
    with pytest.raises(RuntimeError, match=r"x \[n, in\]"):
        kernel.bf16_matvec(x, torch.randn(4, 9).bfloat16())

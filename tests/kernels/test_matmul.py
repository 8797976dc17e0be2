"""kernels/matmul.py on both of its paths (PyTorch's bf16 products; float32 products
rounded once, where the CPU has no native bf16 ones) against float64: each within bf16's
rounding of the result, so a wrong operand, transpose or missing bias fails."""

from __future__ import annotations

import pytest
import torch

from thrifty.kernels import matmul


@pytest.fixture(params=[True, False], ids=["native bf16", "float32 products"])
def path(request, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(matmul, "bf16_gemm_is_native", lambda: request.param)
    return request.param


def close(got: torch.Tensor, exact: torch.Tensor, size: torch.Tensor) -> bool:
    # bf16 result: half an ulp of it, plus the float32 (or bf16-input) sums' roundings.
    return bool(((got.double() - exact).abs() <= 2.0**-8 * exact.abs() + 2.0**-7 * size + 1e-6).all())


def test_mm_and_addmm(path: bool) -> None:
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(shape, generator=g).bfloat16() for shape in ((37, 64), (64, 29), (29,)))
    exact = a.double() @ b.double()
    size = a.double().abs() @ b.double().abs()
    assert matmul.mm(a, b).dtype == torch.bfloat16 and close(matmul.mm(a, b), exact, size)
    assert close(matmul.addmm(c, a, b), exact + c.double(), size + c.double().abs())
    buffer = torch.randn(37, 29, generator=g).bfloat16()
    start = buffer.double()
    assert matmul.addmm_(buffer, a, b) is buffer and close(buffer, exact + start, size + start.abs())


def test_linear_forward_and_gradients(path: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, generator=g).bfloat16().requires_grad_()
    w = torch.randn(48, 64, generator=g).bfloat16().requires_grad_()
    bias = torch.randn(48, generator=g).bfloat16().requires_grad_()
    upstream = torch.randn(3, 5, 48, generator=g).bfloat16()
    y = matmul.linear(x, w, bias)
    y.backward(upstream)
    x64, w64, u64 = x.detach().double(), w.detach().double(), upstream.double()
    assert close(y, x64 @ w64.t() + bias.detach().double(), x64.abs() @ w64.abs().t() + bias.detach().double().abs())
    assert close(x.grad, u64 @ w64, u64.abs() @ w64.abs())
    flat_u, flat_x = u64.reshape(-1, 48), x64.reshape(-1, 64)
    assert close(w.grad, flat_u.t() @ flat_x, flat_u.abs().t() @ flat_x.abs())
    assert close(bias.grad, flat_u.sum(0), flat_u.abs().sum(0))


@pytest.mark.parametrize("transposed", [False, True], ids=["panels of columns", "panels of rows"])
def test_operands_larger_than_a_panel(path: bool, transposed: bool) -> None:
    """An operand above PANEL_ELEMENTS (a 152k-token head) is converted a panel at a time,
    split along its wider side: with a panel's offset or its sum over row panels wrong,
    the columns past the first panel fail."""
    g = torch.Generator().manual_seed(2)
    wide = matmul.PANEL_ELEMENTS // 64 + 999  # two panels and a tail
    a = torch.randn(5, wide if transposed else 64, generator=g).bfloat16()
    b = torch.randn(wide, 64, generator=g).bfloat16() if transposed else torch.randn(64, wide, generator=g).bfloat16()
    exact, size = a.double() @ b.double(), a.double().abs() @ b.double().abs()
    assert close(matmul.mm(a, b), exact, size)
    c = torch.randn(b.shape[1], generator=g).bfloat16()
    assert close(matmul.addmm(c, a, b), exact + c.double(), size + c.double().abs())
    buffer = torch.randn(5, b.shape[1], generator=g).bfloat16()
    start = buffer.double()
    assert close(matmul.addmm_(buffer, a, b), exact + start, size + start.abs())

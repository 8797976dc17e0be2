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


@pytest.mark.parametrize("training", [False, True], ids=["no grad", "forward and backward"])
@pytest.mark.parametrize(("head_dim", "scale"), [(32, None), (256, None), (256, 168**-0.5)],
                         ids=["d32", "d256", "d256-gemma27b-scale"])
def test_pytorch_attention_on_both_paths(path: bool, training: bool, head_dim: int, scale: float | None,
                                         monkeypatch) -> None:  # type: ignore
    """kernels/attention.py where Thrifty's native kernels do not run (they are switched off
    here): bf16 attention through PyTorch, in float32 where bf16 products are not native,
    against float64 softmax(q k^T * scale + mask) v (scale 1/sqrt(d) unless given, as Gemma
    3's query_pre_attn_scalar gives it), values and gradients within bf16's rounding, at
    Gemma's head_dim 256 too. Catches a dropped mask or scale, a lost GQA expansion or a
    missing cast back."""
    from thrifty.kernels import attention

    monkeypatch.setattr(attention, "native_kernel", lambda name: None)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 40, head_dim, generator=g).bfloat16().requires_grad_(training)
    k, v = (torch.randn(2, 2, 40, head_dim, generator=g).bfloat16().requires_grad_(training) for _ in range(2))
    mask = torch.rand(2, 1, 40, 40, generator=g) < 0.7
    mask |= torch.eye(40, dtype=torch.bool)  # every query sees a key
    with torch.set_grad_enabled(training):
        out = attention.scaled_dot_product_attention(q, k, v, mask, is_causal=False, scale=scale)
    assert out.dtype == torch.bfloat16

    def exact(q64, k64, v64):  # type: ignore[no-untyped-def]
        k64, v64 = k64.repeat_interleave(3, dim=1), v64.repeat_interleave(3, dim=1)
        scores = (q64 @ k64.transpose(-1, -2)) * (head_dim ** -0.5 if scale is None else scale)
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v64

    leaves = [t.detach().double().requires_grad_(training) for t in (q, k, v)]
    expected = exact(*leaves)
    assert close(out, expected.detach(), v.detach().double().abs().amax() * torch.ones_like(expected))
    if training:
        upstream = torch.randn(out.shape, generator=g).bfloat16()
        out.backward(upstream)
        expected.backward(upstream.double())
        for got, want in zip((q.grad, k.grad, v.grad), leaves):
            scale = want.grad.abs().amax() * torch.ones_like(want.grad)
            assert close(got, want.grad, 4 * scale)

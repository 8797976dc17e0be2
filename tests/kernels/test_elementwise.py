"""RMSNorm and SwiGLU with hand-written backward: same values and gradients as autograd
through the plain formulas, and fewer bytes kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from thrifty.kernels.elementwise import apply_rope, rms_norm, swiglu
from thrifty.kernels.native import native_kernel

EPS = 1e-5


@pytest.fixture(autouse=True, params=["native", "pytorch"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with the C++ kernels (kernels/csrc/norm_and_activation.cpp and rope.cpp,
    bf16 only) and with the PyTorch ops used where they cannot run."""
    if request.param == "pytorch":
        monkeypatch.setenv("THRIFTY_NATIVE_OFF", "elementwise")
    elif native_kernel("elementwise") is None:
        pytest.skip("no native kernels on this machine: the PyTorch variant covers it")
    return request.param


def assert_same_forward(out: torch.Tensor, ref: torch.Tensor, kernel: str) -> None:
    """The PyTorch ops are the reference's arithmetic, bit for bit. The native kernel
    rounds at the same places, but sums squares in another order and computes exp its
    own way, so a result just at a bf16 rounding boundary can land one ulp away."""
    if kernel == "pytorch" or out.dtype != torch.bfloat16:
        assert torch.equal(out, ref)
    else:
        assert_within_one_ulp(out, ref)


def assert_within_one_ulp(out: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (out.float() - ref.float()).abs()
    ulp = 2**-7 if out.dtype == torch.bfloat16 else 2**-20  # fp32: a few ulps
    assert torch.all(diff <= ref.float().abs() * ulp + 1e-30)
    assert (diff == 0).float().mean().item() >= 0.99


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # Hugging Face's LlamaRMSNorm, verbatim.
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + EPS)
    return weight * hidden.to(x.dtype)


def reference_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def grads(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype))
    return out.detach(), [leaf.grad for leaf in leaves]


def saved_bytes(fn, *inputs: torch.Tensor) -> int:
    """Bytes autograd keeps for backward, counting each storage once."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*leaves)
    return sum(storages.values())


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("width", [64, 40])
def test_rms_norm_matches_reference(dtype: torch.dtype, tolerance: float, width: int, kernel: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, width, generator=g) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(width, generator=g)).to(dtype)
    out, (dx, dw) = grads(lambda a, b: rms_norm(a, b, EPS), x, weight)
    ref, (rdx, rdw) = grads(reference_rms_norm, x, weight)
    assert_same_forward(out, ref, kernel)
    assert (dx.float() - rdx.float()).abs().max().item() <= tolerance * rdx.float().abs().max().item()
    assert (dw.float() - rdw.float()).abs().max().item() <= tolerance * rdw.float().abs().max().item()
    with torch.no_grad():
        assert_same_forward(rms_norm(x, weight, EPS), ref, kernel)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("width", [96, 40])  # 40: a partial last vector of 16 lanes
def test_swiglu_matches_reference(dtype: torch.dtype, tolerance: float, width: int, kernel: str) -> None:
    g = torch.Generator().manual_seed(2)
    gate, up = (torch.randn(4, 7, width, generator=g) * 2).to(dtype), torch.randn(4, 7, width, generator=g).to(dtype)
    out, (dgate, dup) = grads(swiglu, gate, up)
    ref, (rdgate, rdup) = grads(reference_swiglu, gate, up)
    assert_same_forward(out, ref, kernel)
    with torch.no_grad():  # generation's fused gate_up projection hands over column slices
        gate_up = torch.cat([gate, up], dim=-1)
        # (PyTorch's own silu takes another code path on strided input: not bit-exact either.)
        assert_within_one_ulp(swiglu(gate_up[..., :width], gate_up[..., width:]), ref)
    assert (dgate.float() - rdgate.float()).abs().max().item() <= tolerance * rdgate.float().abs().max().item()
    assert (dup.float() - rdup.float()).abs().max().item() <= tolerance * rdup.float().abs().max().item()


def test_lean_ops_keep_less_for_backward(kernel: str) -> None:
    x = torch.randn(8, 128, 576, dtype=torch.bfloat16)
    weight = torch.ones(576, dtype=torch.bfloat16)
    frozen_weight = lambda a: rms_norm(a, weight, EPS)  # noqa: E731 (LoRA: the norm weight is frozen)
    assert saved_bytes(frozen_weight, x) <= 0.55 * saved_bytes(lambda a: reference_rms_norm(a, weight), x)
    gate, up = torch.randn(2, 8, 128, 1536, dtype=torch.bfloat16).unbind(0)
    assert saved_bytes(swiglu, gate, up) <= 0.7 * saved_bytes(reference_swiglu, gate, up)


def reference_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Hugging Face's apply_rotary_pos_emb for one tensor, verbatim.
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,cos_batch", [(64, 2), (16, 1)])  # 16: half a vector of lanes
def test_rope_matches_reference(dtype: torch.dtype, head_dim: int, cos_batch: int) -> None:
    g = torch.Generator().manual_seed(4)
    # q as the model has it: [batch, seq, heads, dim] memory seen as [batch, heads, seq, dim].
    x = torch.randn(2, 9, 3, head_dim, generator=g).to(dtype).transpose(1, 2)
    angles = torch.randn(cos_batch, 1, 9, head_dim // 2, generator=g) * 3
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    out, (dx,) = grads(lambda a: apply_rope(a, cos, sin), x)
    ref, (rdx,) = grads(lambda a: reference_rope(a, cos, sin), x)
    # Products and sums round as the reference's bf16 ops do, and nothing else: bit-exact.
    assert torch.equal(out, ref)
    torch.testing.assert_close(dx, rdx, atol=0, rtol=0)

"""Matrix products of frozen, dequantized weights, where the CPU decides how to take them.

On a CPU without AVX-512 (AMD Zen 3, many laptops), PyTorch multiplies bf16 matrices
with a slow generic kernel, slowest when the right operand is not transposed: measured
[512, 1536] @ [1536, 576] at 663 ms in bf16 against 28 ms in float32 (AMD EPYC Milan,
2 threads). There the product runs in float32 and is rounded once to bf16, which is
also what oneDNN's bf16 kernels compute (float32 sums, one rounding). A large operand
is converted a panel at a time: converted whole, a 152k-token head became a 0.9 GB
float32 copy in every loss chunk, the largest allocation of a 1.5B model's training step.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def bf16_gemm_is_native() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX-512 or newer)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def in_float32(t: torch.Tensor) -> bool:
    """Whether products with bf16 tensor `t` are taken in float32 here."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and not bf16_gemm_is_native()


# Elements of an operand converted to float32 at once (32 MB).
PANEL_ELEMENTS = 1 << 23


def float32_mm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """c + a @ b in float32 (c float32, broadcasting like torch.addmm's; None: a @ b), `b`
    converted PANEL_ELEMENTS at a time: split along its wider side, columns (each panel's
    product is a slice of the result) or rows (the panels' products are summed in float32)."""
    a32 = a.float()
    if b.numel() <= PANEL_ELEMENTS:
        return torch.mm(a32, b.float()) if c is None else torch.addmm(c, a32, b.float())
    shape = (a.shape[0], b.shape[1])
    result = torch.zeros(shape, device=a.device) if c is None else c.expand(shape).clone()
    if b.shape[1] >= b.shape[0]:
        width = max(1, PANEL_ELEMENTS // b.shape[0])
        for start in range(0, b.shape[1], width):
            result[:, start:start + width].addmm_(a32, b[:, start:start + width].float())
    else:
        height = max(1, PANEL_ELEMENTS // b.shape[1])
        for start in range(0, b.shape[0], height):
            result.addmm_(a32[:, start:start + height], b[start:start + height].float())
    return result


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D operands of one dtype, in that dtype."""
    if in_float32(a):
        return float32_mm(a, b).to(torch.bfloat16)
    return a @ b


def addmm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c + a @ b, rounded once to the operands' dtype (c broadcasts like torch.addmm's)."""
    if in_float32(a):
        return float32_mm(a, b, c.float()).to(torch.bfloat16)
    return torch.addmm(c, a, b)


def addmm_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c += a @ b in place (an accumulation buffer), rounded once to c's dtype."""
    if in_float32(a):
        return c.copy_(float32_mm(a, b, c.float()))
    return c.addmm_(a, b)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), differentiable; where bf16 products are not native (see
    above), forward and backward multiply in float32 and round once to bf16 (measured
    fwd + bwd of [1024, 576] x [1536, 576]: 2.3 s in bf16, 0.13 s this way)."""
    if in_float32(x):
        return _Float32Linear.apply(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


class _Float32Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        flat = x.reshape(-1, x.shape[-1])
        out = float32_mm(flat, weight.t())
        if bias is not None:
            out += bias.float()
        return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        x, weight = ctx.saved_tensors
        flat_grad = grad.reshape(-1, grad.shape[-1]).float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = float32_mm(flat_grad, weight).to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(flat_grad.t(), x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat_grad.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b

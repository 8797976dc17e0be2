"""RMSNorm and SwiGLU with hand-written backward passes that keep less for backward.

Autograd through the plain formulas saves every intermediate: RMSNorm keeps an fp32
copy of its input (twice the bf16 activation), and silu(gate) * up keeps gate, silu(gate)
and up. These functions keep only their bf16 inputs (plus RMSNorm's per-row scale) and
recompute the rest in backward, which is cheap elementwise work. For the default model
that is ~40% less activation memory per token (about 23 -> 14 KB per layer), which is
most of a training step's peak memory without activation checkpointing.

The forward arithmetic is the reference's, op for op (fp32 normalisation rounded to the
input dtype, then scaled), in training and inference alike; gradients agree to rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _normalise(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * rstd in fp32, rstd): the reference's formula, op for op."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
    return x32 * rstd, rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        normed32, rstd = _normalise(x, eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed32.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        normed32 = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            products = grad * normed32.to(x.dtype)
            grad_weight = products.reshape(-1, products.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed)), with g the
            # gradient arriving at the fp32 normalised value.
            g = (grad * weight).float()
            grad_x = (rstd * (g - normed32 * (g * normed32).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        # Autograd's own arithmetic for silu(gate) * up, with silu(gate) recomputed.
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x normalised in fp32, rounded to x's dtype).

    Always in fp32: F.rms_norm straight on bf16 input was measured to derail the default
    model's greedy answers."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return weight * _normalise(x, eps)[0].to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate) * up

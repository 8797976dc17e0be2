"""Training-time fusion of the LoRA layers that read the same input (q/k/v, gate/up).

Autograd over separate LoraLinear layers records, per layer, a base matmul, two
rank-r matmuls, a scaling and two dtype casts, and in backward adds each branch's
share of x's gradient into it: ten [tokens, hidden] additions per decoder layer,
plus rank-16 matmuls that run far below the bf16 peak. One autograd Function per
group computes the same values with the group's A matrices stacked (one rank-sum(r)
matmul each way instead of one per layer) and accumulates every term of x's gradient
into one buffer with addmm_. Per group, forward + backward at 2048 tokens: q/k/v 1.53x,
gate/up 1.37x, down 1.09x, o 1.04x faster.

The arithmetic is LoraLinear's: base output plus (x @ A^T * scaling) @ B^T, the branch
in the activation dtype, fp32 master weights receiving fp32 gradients. Layers that
need more than that (dropout, DoRA, a quantized base, a merged or disabled adapter) keep their own forward; see `fusable_lora_group`.
"""

from __future__ import annotations

import torch
from torch import nn

from thrifty.kernels.matmul import addmm, addmm_, mm
from thrifty.layers.lora import LoraLinear


def fusable_lora_group(layers: list[nn.Module], x: torch.Tensor) -> bool:
    """Whether lora_group_forward computes exactly what the layers' own forwards would."""
    return all(
        isinstance(layer, LoraLinear)
        and layer.plain_base is not None
        and not layer.disabled
        and not any(p.requires_grad for p in layer.base_layer.parameters())
        and layer.base_layer.weight.dtype == x.dtype
        and (isinstance(layer.lora_dropout, nn.Identity) or not layer.training)
        for layer in layers
    )


def lora_group_forward(layers: list[LoraLinear], x: torch.Tensor,
                       known_outputs: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
    """(layer(x) for layer in layers) through one autograd node.

    known_outputs ([tokens, out] each): the outputs when they are known already, as in a
    checkpointed layer's recomputation (activation_checkpointing.py). The node is then
    rebuilt without the base matmuls: its backward needs only x and the LoRA branch.
    """
    flat = x.reshape(-1, x.shape[-1])
    weights = [layer.base_layer.weight for layer in layers]
    biases = [layer.base_layer.bias for layer in layers]
    scalings = [layer.scaling for layer in layers]
    adapters = [layer.lora_A.weight for layer in layers] + [layer.lora_B.weight for layer in layers]
    outs = _LoraGroup.apply(flat, weights, biases, scalings, known_outputs, *adapters)
    return tuple(out.view(*x.shape[:-1], out.shape[-1]) for out in outs)


class _LoraGroup(torch.autograd.Function):
    """Separate outputs (not column slices of one): their gradients then arrive
    separately too, with no concatenation in backward."""

    @staticmethod
    def forward(ctx, x, weights, biases, scalings, known_outputs, *adapters):  # type: ignore[no-untyped-def]
        n = len(weights)
        lora_a, lora_b = adapters[:n], adapters[n:]
        dtype = x.dtype
        a_stacked = torch.cat([a.to(dtype) for a in lora_a])  # [sum r, in]
        b_cast = [b.to(dtype) for b in lora_b]
        ranks = [a.shape[0] for a in lora_a]

        # Scale the [tokens, r] intermediates, as LoraLinear does (same rounding).
        xa = torch.mm(x, a_stacked.t()).split(ranks, dim=1)
        for part, scaling in zip(xa, scalings):
            part.mul_(scaling)

        if known_outputs is not None:
            outs = [out.detach() for out in known_outputs]  # new tensors: apply() attaches this node
        else:
            outs = []
            for weight, bias, b, part in zip(weights, biases, b_cast, xa):
                out = mm(x, weight.t()) if bias is None else addmm(bias, x, weight.t())
                outs.append(out.addmm_(part, b.t()))

        ctx.save_for_backward(x, a_stacked, *weights, *b_cast, *xa)
        ctx.scalings = scalings
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):  # type: ignore[no-untyped-def]
        n = len(ctx.scalings)
        x, a_stacked, *rest = ctx.saved_tensors
        weights, b_cast, xa = rest[:n], rest[n:2 * n], rest[2 * n:]

        grad_xa = []
        grad_b = []
        for grad, b, part, scaling in zip(grad_outs, b_cast, xa, ctx.scalings):
            grad_xa.append(torch.mm(grad, b).mul_(scaling))
            grad_b.append(torch.mm(grad.t(), part).float())
        grad_xa_stacked = torch.cat(grad_xa, dim=1) if n > 1 else grad_xa[0]
        grad_a = torch.mm(grad_xa_stacked.t(), x).float().split([part.shape[1] for part in xa])

        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_xa_stacked, a_stacked)
            for weight, grad in zip(weights, grad_outs):
                addmm_(grad_x, grad, weight)
        return grad_x, None, None, None, None, *grad_a, *grad_b

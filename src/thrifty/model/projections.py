"""The two seams every decoder layer calls: `project` for its linear layers and
`attention` for scaled dot-product attention. Which implementation runs is decided
here, once, from the state of the call, so the decoder's arithmetic is written once:

* no gradients, inside an InferencePlan's `active()` block (generation): the plan's
  fused, pre-packed matmuls for the group (fused_linear.py);
* a group of plain LoRA layers (training, or scoring without gradients): one autograd
  node for the group (layers/lora_group.py), reusing the outputs a checkpointed layer
  kept (activation_checkpointing.py) when it is recomputed;
* anything else (dropout, DoRA, a quantized or merged base): the layers' own forwards,
  plain nn.Linear layers through kernels/matmul.py (float32 products where this CPU has
  no native bf16 ones).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn

from thrifty.kernels import matmul
from thrifty.kernels.attention import attention_with_logsumexp, scaled_dot_product_attention
from thrifty.layers.lora_group import fusable_lora_group, lora_group_forward
from thrifty.model.activation_checkpointing import current_layer_call
from thrifty.model.fused_linear import FusedLinear


class ProjectionPlan(Protocol):
    """What the seam needs of an InferencePlan (inference_plan.py)."""

    def group(self, owner: nn.Module, name: str) -> FusedLinear | None: ...


# The plan whose copies no-gradient forwards use (InferencePlan.active sets it).
_plan_in_force: contextvars.ContextVar[ProjectionPlan | None] = contextvars.ContextVar("plan", default=None)


@contextlib.contextmanager
def computing_with(plan: ProjectionPlan) -> Iterator[None]:
    token = _plan_in_force.set(plan)
    try:
        yield
    finally:
        _plan_in_force.reset(token)


def project(owner: nn.Module, name: str, layers: list[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(layer(x) for layer in layers), for the group `name` of `owner` (e.g. "qkv")."""
    grad = torch.is_grad_enabled()
    plan = None if grad else _plan_in_force.get()
    if plan is not None:
        fused = plan.group(owner, name)
        if fused is not None:
            return fused.split(x)
    if fusable_lora_group(layers, x):
        call = current_layer_call() if grad else None
        known = call.known_outputs(name, layers, x) if call is not None else None
        outputs = lora_group_forward(layers, x, known_outputs=known)  # type: ignore[arg-type]
        if call is not None:
            call.remember(name, outputs)
        return outputs
    return tuple(matmul.linear(x, layer.weight, layer.bias) if type(layer) is nn.Linear else layer(x)
                 for layer in layers)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              is_causal: bool, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over [batch, heads, seq, head_dim], GQA (scale None:
    1 / sqrt(head_dim)); `mask` boolean [batch, 1, queries, keys], True where a query may attend."""
    call = current_layer_call()
    if call is not None and call.keeps("attention"):
        known = call.kept.get("attention") if call.recomputing else None
        result = attention_with_logsumexp(q, k, v, mask, is_causal, known=known, scale=scale)
        if result is not None:  # the native kernels: their output and logsumexp can be kept
            out, logsumexp = result
            call.remember("attention", (out.detach(), logsumexp))
            return out
    return scaled_dot_product_attention(q, k, v, mask, is_causal, scale)

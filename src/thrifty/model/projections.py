"""The two seams every decoder layer calls: `project` for its linear layers and
`attention` for scaled dot-product attention. Which implementation runs is decided
here, once, from the state of the call, so the decoder's arithmetic is written once:

* no gradients (generation, scoring): the group's fused, pre-packed matmul
  (fused_linear.py), or Thrifty's native decoding kernels;
* training with a group of plain LoRA layers: one autograd node for the group
  (layers/lora_group.py), reusing the outputs a checkpointed layer kept
  (activation_checkpointing.py) when it is recomputed;
* anything else (dropout, DoRA, a quantized or merged base): the layers' own forwards.
"""

from __future__ import annotations

import torch
from torch import nn

from thrifty.kernels.attention import attention_with_logsumexp, scaled_dot_product_attention
from thrifty.layers.lora_group import fusable_for_training, lora_group_forward
from thrifty.model.activation_checkpointing import current_layer_call
from thrifty.model.fused_linear import fused_for_inference


def project(owner: nn.Module, name: str, layers: list[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(layer(x) for layer in layers), for the group `name` of `owner` (e.g. "qkv")."""
    if not torch.is_grad_enabled():
        fused = fused_for_inference(owner, name, layers)
        if fused is not None:
            return fused.split(x)
    elif fusable_for_training(layers, x):
        call = current_layer_call()
        known = call.known_outputs(name, layers, x) if call is not None else None
        outputs = lora_group_forward(layers, x, known_outputs=known)  # type: ignore[arg-type]
        if call is not None:
            call.remember(name, outputs)
        return outputs
    return tuple(layer(x) for layer in layers)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              is_causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [batch, heads, seq, head_dim], GQA; `mask` boolean
    [batch, 1, queries, keys], True where a query may attend."""
    call = current_layer_call()
    if call is not None and call.keeps("attention"):
        known = call.kept.get("attention") if call.recomputing else None
        result = attention_with_logsumexp(q, k, v, mask, is_causal, known=known)
        if result is not None:  # the native kernels: their output and logsumexp can be kept
            out, logsumexp = result
            call.remember("attention", (out.detach(), logsumexp))
            return out
    return scaled_dot_product_attention(q, k, v, mask, is_causal)

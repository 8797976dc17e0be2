"""Activation checkpointing per decoder layer, added from outside the model.

With it on, backward keeps only each layer's input and recomputes the layer's
activations when it needs them: memory for activations drops from ~all of every
layer's intermediates to one tensor per layer, for ~1/3 more compute (one extra
forward). The layer's forward is wrapped on the instance, so module and parameter
names (what checkpoints, LoRA and PEFT files use) do not change.

With keep_mlp_outputs, a LoRA layer also keeps its MLP's gate and up projections'
outputs (2 x intermediate_size values per token, ~5x the layer input), so the
recomputation skips the MLP's matmuls, ~3/4 of its work: the gate/up outputs are
known, and the down projection's output is never read (backward needs only the
saved tensors, and the layer output is the last thing a layer computes).

With keep_attention_outputs, it also keeps its q/k/v projections' outputs and the
attention's output and logsumexp (q + 2 kv + q widths plus one float per head per
token, ~2.7x the layer input for SmolLM2), so the recomputation skips the q/k/v
matmuls and the attention forward kernel too: what is left of it is the norms, RoPE
and the o projection. Both only change what is recomputed, never a number (tested).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from thrifty.kernels.attention import attention_with_logsumexp, scaled_dot_product_attention
from thrifty.kernels.elementwise import swiglu
from thrifty.layers.lora_group import fusable_for_training, lora_group_forward


@dataclass
class _LayerCall:
    """One checkpointed call of a layer: what its forward keeps for its recomputation."""

    mlp_outputs: tuple[torch.Tensor, torch.Tensor] | None = None
    qkv_outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    attention_outputs: tuple[torch.Tensor, torch.Tensor] | None = None  # (output, logsumexp)
    recomputing: bool = False


_current_call: ContextVar[_LayerCall | None] = ContextVar("thrifty_checkpointed_layer", default=None)


def enable_activation_checkpointing(model: nn.Module, keep_mlp_outputs: bool = False,
                                    keep_attention_outputs: bool = False) -> None:
    """Checkpoint every layer in `model.model.layers` while gradients are enabled."""
    for layer in model.model.layers:
        if "forward" in layer.__dict__:
            continue  # already wrapped
        layer.forward = _checkpointed(layer)
        if keep_mlp_outputs:
            layer.mlp.forward = _mlp_keeping_outputs(layer.mlp)
        if keep_attention_outputs:
            layer.self_attn.forward = _attention_keeping_outputs(layer.self_attn)


def disable_activation_checkpointing(model: nn.Module) -> None:
    for layer in model.model.layers:
        for module in (layer, layer.mlp, layer.self_attn):
            module.__dict__.pop("forward", None)


def _checkpointed(layer: nn.Module) -> Any:
    forward = type(layer).forward.__get__(layer)

    def run(*args: Any) -> Any:
        if not (torch.is_grad_enabled() and layer.training):
            return forward(*args)  # eval / generation: nothing to save memory on
        # Non-reentrant: works when the layer input needs no grad (frozen embeddings
        # under LoRA); preserve_rng_state replays dropout. The recomputation runs in
        # backward, outside any `sdpa_kernel` context the forward ran in: re-enter the
        # same attention kernel choice, or it would save different tensors (an error).
        backends = _enabled_sdpa_backends()
        call = _LayerCall()
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True,
                          context_fn=lambda: (_inside(call), _recomputing(call, backends)))

    return run


@contextlib.contextmanager
def _inside(call: _LayerCall, recomputing: bool = False) -> Iterator[None]:
    token = _current_call.set(call)
    call.recomputing = recomputing
    try:
        yield
    finally:
        _current_call.reset(token)


@contextlib.contextmanager
def _recomputing(call: _LayerCall, backends: list[SDPBackend]) -> Iterator[None]:
    with _inside(call, recomputing=True), sdpa_kernel(backends):
        yield


def _mlp_keeping_outputs(mlp: nn.Module) -> Any:
    """The MLP's forward, keeping its gate/up outputs inside a checkpointed layer and
    reusing them in the recomputation. The arithmetic is MLP.forward's (model.py) on the
    LoRA path."""
    forward = type(mlp).forward.__get__(mlp)

    def run(x: torch.Tensor) -> torch.Tensor:
        call = _current_call.get()
        gate_up, down = [mlp.gate_proj, mlp.up_proj], [mlp.down_proj]
        if call is None or not fusable_for_training(gate_up + down, x):
            return forward(x)
        if not call.recomputing:
            gate, up = lora_group_forward(gate_up, x)
            call.mlp_outputs = (gate.detach().flatten(0, -2), up.detach().flatten(0, -2))
            (out,) = lora_group_forward(down, swiglu(gate, up))
            return out
        gate, up = lora_group_forward(gate_up, x, known_outputs=call.mlp_outputs)
        hidden = swiglu(gate, up)
        unread = hidden.new_empty(()).expand(hidden.shape[:-1].numel(), mlp.down_proj.out_features)
        (out,) = lora_group_forward(down, hidden, known_outputs=(unread,))
        return out

    return run


def _attention_keeping_outputs(attention: nn.Module) -> Any:
    """The attention's forward, keeping its q/k/v outputs and the attention's output and
    logsumexp inside a checkpointed layer and reusing them in the recomputation. The
    arithmetic is Attention.forward's (model.py) on the LoRA path."""
    forward = type(attention).forward.__get__(attention)

    def run(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
            cache: Any) -> torch.Tensor:
        call = _current_call.get()
        qkv = [attention.q_proj, attention.k_proj, attention.v_proj]
        if call is None or cache is not None or not fusable_for_training(qkv, x):
            return forward(x, cos, sin, mask, cache)
        if not call.recomputing:
            q, k, v = lora_group_forward(qkv, x)
            call.qkv_outputs = (q.detach().flatten(0, -2), k.detach().flatten(0, -2), v.detach().flatten(0, -2))
        else:
            q, k, v = lora_group_forward(qkv, x, known_outputs=call.qkv_outputs)
        return attention.attend(q, k, v, cos, sin, mask, cache, attention=partial(_attention_keeping_output, call))

    return run


def _attention_keeping_output(call: _LayerCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    result = attention_with_logsumexp(q, k, v, mask, is_causal,
                                      known=call.attention_outputs if call.recomputing else None)
    if result is None:  # not the native kernels: recomputed as usual
        return scaled_dot_product_attention(q, k, v, mask, is_causal)
    out, logsumexp = result
    if not call.recomputing:
        call.attention_outputs = (out.detach(), logsumexp)
    return out


def _enabled_sdpa_backends() -> list[SDPBackend]:
    """The SDPA kernels allowed right now (torch.backends.cuda's flags govern CPU too)."""
    flags = torch.backends.cuda
    enabled = [(flags.flash_sdp_enabled(), SDPBackend.FLASH_ATTENTION),
               (flags.mem_efficient_sdp_enabled(), SDPBackend.EFFICIENT_ATTENTION),
               (flags.math_sdp_enabled(), SDPBackend.MATH),
               (flags.cudnn_sdp_enabled(), SDPBackend.CUDNN_ATTENTION)]
    return [backend for on, backend in enabled if on]

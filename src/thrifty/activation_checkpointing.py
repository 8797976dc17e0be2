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
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from thrifty.lean_ops import swiglu
from thrifty.lora_group import fusable_for_training, lora_group_forward


@dataclass
class _LayerCall:
    """One checkpointed call of a layer: what its forward keeps for its recomputation."""

    mlp_outputs: tuple[torch.Tensor, torch.Tensor] | None = None
    recomputing: bool = False


_current_call: ContextVar[_LayerCall | None] = ContextVar("thrifty_checkpointed_layer", default=None)


def enable_activation_checkpointing(model: nn.Module, keep_mlp_outputs: bool = False) -> None:
    """Checkpoint every layer in `model.model.layers` while gradients are enabled."""
    for layer in model.model.layers:
        if "forward" in layer.__dict__:
            continue  # already wrapped
        layer.forward = _checkpointed(layer)
        if keep_mlp_outputs:
            layer.mlp.forward = _mlp_keeping_outputs(layer.mlp)


def disable_activation_checkpointing(model: nn.Module) -> None:
    for layer in model.model.layers:
        layer.__dict__.pop("forward", None)
        layer.mlp.__dict__.pop("forward", None)


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


def _enabled_sdpa_backends() -> list[SDPBackend]:
    """The SDPA kernels allowed right now (torch.backends.cuda's flags govern CPU too)."""
    flags = torch.backends.cuda
    enabled = [(flags.flash_sdp_enabled(), SDPBackend.FLASH_ATTENTION),
               (flags.mem_efficient_sdp_enabled(), SDPBackend.EFFICIENT_ATTENTION),
               (flags.math_sdp_enabled(), SDPBackend.MATH),
               (flags.cudnn_sdp_enabled(), SDPBackend.CUDNN_ATTENTION)]
    return [backend for on, backend in enabled if on]

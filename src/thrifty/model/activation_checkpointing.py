"""Activation checkpointing per decoder layer, added from outside the model.

With it on, backward keeps only each layer's input and recomputes the layer's
activations when it needs them: memory for activations drops from ~all of every
layer's intermediates to one tensor per layer, for ~1/3 more compute (one extra
forward). The layer's forward is wrapped on the instance with torch's checkpoint, so
module and parameter names (what checkpoints, LoRA and PEFT files use) do not change,
and the layer's own forward runs both times: its arithmetic is written once
(model/decoder.py).

A checkpointed call can also keep some outputs for its recomputation. The layer's
projection and attention seams (model/projections.py) read the call from a context:

* keep_mlp_outputs: a LoRA layer keeps its MLP's gate and up projections' outputs
  (2 x intermediate_size values per token, ~5x the layer input), so the recomputation
  skips the MLP's matmuls, ~3/4 of its work: the gate/up outputs are known, and the
  down projection's output is never read (backward needs only the saved tensors, and
  the layer output is the last thing a layer computes; not so in Gemma 3, which norms
  it: there the down projection is recomputed).
* keep_attention_outputs: it also keeps its q/k/v projections' outputs and the
  attention's output and logsumexp (q + 2 kv + q widths plus one float per head per
  token, ~2.7x the layer input for SmolLM2), so the recomputation skips the q/k/v
  matmuls and the attention forward kernel too: what is left of it is the norms, RoPE
  and the o projection.

Both only change what is recomputed, never a number (tested).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

# The last projection of a layer: in the recomputation its output is never read.
LAST_PROJECTION = "down"


@dataclass
class LayerCall:
    """One checkpointed call of a layer: which outputs it keeps, and those it kept."""

    keep: frozenset[str]  # "qkv", "gate_up" (projection groups) and "attention"
    last_output_unread: bool = True  # whether backward never reads LAST_PROJECTION's output
    kept: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    recomputing: bool = False

    def keeps(self, name: str) -> bool:
        return name in self.keep

    def remember(self, name: str, outputs: tuple[torch.Tensor, ...]) -> None:
        """Keep a first pass's outputs of `name` if this call keeps them."""
        if self.recomputing or name not in self.keep:
            return
        self.kept[name] = tuple(out.detach().flatten(0, -2) if name != "attention" else out for out in outputs)

    def known_outputs(self, name: str, layers: list[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """In the recomputation, a projection group's outputs when they need no matmul: those
        kept by the first pass, and the last projection's once its input was kept (unread)."""
        if not self.recomputing:
            return None
        if name in self.kept:
            return self.kept[name]
        if name == LAST_PROJECTION and "gate_up" in self.kept and self.last_output_unread:
            rows = x.shape[:-1].numel()
            return tuple(x.new_empty(()).expand(rows, layer.out_features) for layer in layers)
        return None


_current_call: ContextVar[LayerCall | None] = ContextVar("thrifty_checkpointed_layer", default=None)


def current_layer_call() -> LayerCall | None:
    """The checkpointed layer call running now, if any."""
    return _current_call.get()


def enable_activation_checkpointing(model: nn.Module, keep_mlp_outputs: bool = False,
                                    keep_attention_outputs: bool = False) -> None:
    """Checkpoint every layer in `model.model.layers` while gradients are enabled."""
    keep = frozenset((["gate_up"] if keep_mlp_outputs else []) + (["qkv", "attention"] if keep_attention_outputs else []))
    unread = not model.config.gemma_norms  # Gemma's post_feedforward_layernorm reads it
    for layer in model.model.layers:
        if "forward" not in layer.__dict__:  # not wrapped already
            layer.forward = _checkpointed(layer, keep, unread)


def disable_activation_checkpointing(model: nn.Module) -> None:
    for layer in model.model.layers:
        layer.__dict__.pop("forward", None)


def _checkpointed(layer: nn.Module, keep: frozenset[str], last_output_unread: bool) -> Any:
    forward = type(layer).forward.__get__(layer)

    def run(*args: Any) -> Any:
        if not (torch.is_grad_enabled() and layer.training):
            return forward(*args)  # eval / generation: nothing to save memory on
        # Non-reentrant: works when the layer input needs no grad (frozen embeddings
        # under LoRA); preserve_rng_state replays dropout. The recomputation runs in
        # backward, outside any `sdpa_kernel` context the forward ran in: re-enter the
        # same attention kernel choice, or it would save different tensors (an error).
        backends = _enabled_sdpa_backends()
        call = LayerCall(keep, last_output_unread)
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True,
                          context_fn=lambda: (_inside(call), _recomputing(call, backends)))

    return run


@contextlib.contextmanager
def _inside(call: LayerCall, recomputing: bool = False) -> Iterator[None]:
    token = _current_call.set(call)
    call.recomputing = recomputing
    try:
        yield
    finally:
        _current_call.reset(token)


@contextlib.contextmanager
def _recomputing(call: LayerCall, backends: list[SDPBackend]) -> Iterator[None]:
    with _inside(call, recomputing=True), sdpa_kernel(backends):
        yield


def _enabled_sdpa_backends() -> list[SDPBackend]:
    """The SDPA kernels allowed right now (torch.backends.cuda's flags govern CPU too)."""
    flags = torch.backends.cuda
    enabled = [(flags.flash_sdp_enabled(), SDPBackend.FLASH_ATTENTION),
               (flags.mem_efficient_sdp_enabled(), SDPBackend.EFFICIENT_ATTENTION),
               (flags.math_sdp_enabled(), SDPBackend.MATH),
               (flags.cudnn_sdp_enabled(), SDPBackend.CUDNN_ATTENTION)]
    return [backend for on, backend in enabled if on]

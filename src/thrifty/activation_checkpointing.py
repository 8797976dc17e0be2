"""Activation checkpointing per decoder layer, added from outside the model.

With it on, backward keeps only each layer's input and recomputes the layer's
activations when it needs them: memory for activations drops from ~all of every
layer's intermediates to one tensor per layer, for ~1/3 more compute (one extra
forward). The layer's forward is wrapped on the instance, so module and parameter
names (what checkpoints, LoRA and PEFT files use) do not change.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint every layer in `model.model.layers` while gradients are enabled."""
    for layer in model.model.layers:
        if "forward" in layer.__dict__:
            continue  # already wrapped
        layer.forward = _checkpointed(layer)


def disable_activation_checkpointing(model: nn.Module) -> None:
    for layer in model.model.layers:
        layer.__dict__.pop("forward", None)


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
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True,
                          context_fn=lambda: (contextlib.nullcontext(), sdpa_kernel(backends)))

    return run


def _enabled_sdpa_backends() -> list[SDPBackend]:
    """The SDPA kernels allowed right now (torch.backends.cuda's flags govern CPU too)."""
    flags = torch.backends.cuda
    enabled = [(flags.flash_sdp_enabled(), SDPBackend.FLASH_ATTENTION),
               (flags.mem_efficient_sdp_enabled(), SDPBackend.EFFICIENT_ATTENTION),
               (flags.math_sdp_enabled(), SDPBackend.MATH),
               (flags.cudnn_sdp_enabled(), SDPBackend.CUDNN_ATTENTION)]
    return [backend for on, backend in enabled if on]

"""Inference-only fusion of Linear layers that read the same input.

q/k/v (and gate/up) projections stay separate nn.Linear modules, as checkpoints,
LoRA and PEFT expect. When no gradients are needed, one matmul over their
concatenated weights replaces three (or two): on a CPU at decoding batch sizes
each matmul call costs more in overhead and in half-used weight streaming than
in arithmetic. On CPU, bf16 weights are also pre-packed into oneDNN's blocked
layout once, instead of being re-laid-out by every call.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def can_prepack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class FusedLinear:
    """y = concat(layer(x) for layer in layers), as one matmul, kept in sync with the
    layers' weights: if any weight is replaced or updated in place (training, LoRA
    merge, dtype change), the fused copy is rebuilt on the next call."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        self.layers = layers
        self.sizes = [layer.out_features for layer in layers]
        self.source: tuple | None = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.prepacked = False

    # The fused weight is derived data (and an opaque oneDNN tensor that cannot be
    # copied or pickled): copies start without it and rebuild it on first use.
    def __getstate__(self) -> dict:
        return {"layers": self.layers}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["layers"])  # type: ignore[misc]

    def __deepcopy__(self, memo: dict) -> FusedLinear:
        return FusedLinear([copy.deepcopy(layer, memo) for layer in self.layers])

    def source_key(self) -> tuple:
        return tuple((layer.weight.data_ptr(), layer.weight._version, layer.weight.dtype)
                     for layer in self.layers)

    def rebuild(self) -> None:
        weight = torch.cat([layer.weight.detach() for layer in self.layers])
        biases = [layer.bias for layer in self.layers]
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.cat([
                b.detach() if b is not None else weight.new_zeros(layer.out_features)
                for b, layer in zip(biases, self.layers)
            ])
        self.prepacked = can_prepack(weight)
        if self.prepacked:
            # The batch-size hint only tunes the packing; any batch size works.
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = self.source_key()
        if key != self.source:
            self.rebuild()
            self.source = key
        # Flatten to 2-D: a 3-D bf16 input can fall into a slow bmm over an expanded weight.
        flat = x.reshape(-1, x.shape[-1])
        if self.prepacked:
            out = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        else:
            out = F.linear(flat, self.weight, self.bias)
        return out.view(*x.shape[:-1], out.shape[-1])

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self(x).split(self.sizes, dim=-1)


def fused_for_inference(owner: nn.Module, layers: list[nn.Module]) -> FusedLinear | None:
    """The FusedLinear over `layers`, cached on `owner`; None if they cannot fuse.

    Only plain nn.Linear layers fuse: LoRA or quantized layers keep their own forward.
    The cache is kept outside the module's parameters and buffers (it is derived data,
    not state) and is rebuilt when any of the layers is swapped for another module.
    """
    if not all(type(layer) is nn.Linear for layer in layers):
        owner.__dict__.pop("_fused_for_inference", None)  # free a stale fused copy
        return None
    cached = owner.__dict__.get("_fused_for_inference")
    if cached is None or any(a is not b for a, b in zip(cached.layers, layers)):
        cached = FusedLinear(layers)  # type: ignore[arg-type]
        owner.__dict__["_fused_for_inference"] = cached
    return cached

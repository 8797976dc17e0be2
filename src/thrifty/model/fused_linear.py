"""Inference-only fusion of Linear layers that read the same input.

q/k/v (and gate/up) projections stay separate nn.Linear modules, as checkpoints,
LoRA and PEFT expect. When no gradients are needed, one matmul over their
concatenated weights replaces three (or two): on a CPU at decoding batch sizes
each matmul call costs more in overhead and in half-used weight streaming than
in arithmetic. On CPU, bf16 weights (of every projection and the LM head) are also
pre-packed into oneDNN's blocked layout once: a pre-packed matmul at decoding
batch sizes takes ~60% of the time of F.linear, which re-lays-out the weight on
every call.

LoRA-wrapped layers fuse too: their frozen base weights join the fused matmul and
the live adapters add their low-rank branch on top, so generation during GRPO uses
the current adapter weights with no merge and no copy of the base. The adapters of a
group run as two small fp32 matmuls over their stacked A matrices and a block-diagonal
B (scaling folded in), rebuilt only when an adapter changes: one rank-16 branch per
layer in bf16, added into a column slice of the output, had made LoRA generation 2x
slower than the plain model (bf16 matmuls with K = 16 take a slow path on CPU).

Where Thrifty's native decoding matmul runs (CPUs with AVX-512 BF16), decoding-sized
batches go through kernels/csrc/decode_linear.cpp instead: weights streamed in blocks of 32
columns through the AMX tile unit (or the vector units where there is none), with the
LoRA branch accumulated into the same sums. Bigger batches (prefill, scoring) then
multiply by the layers' own weights, compute-bound there, so no second packed copy of
the weights is kept.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.kernels.native import native_kernel
from thrifty.layers.lora import LoraLinear

# Rows up to which the native decode kernel runs (it was 0.5-1.4x oneDNN's speed at 100+).
DECODE_ROWS = 64


class _FrozenWeights:
    token: object | None = None  # set inside weights_frozen()


@contextlib.contextmanager
def weights_frozen() -> Iterator[None]:
    """A block (one generate call) in which no weight, adapter or layer is replaced or
    updated: each fused group checks that its fused copy is current on its first call in
    the block only. Checked on every decoding step, the key tuples and module lookups
    were ~10% of the step."""
    previous = _FrozenWeights.token
    _FrozenWeights.token = object()
    try:
        yield
    finally:
        _FrozenWeights.token = previous


def can_prepack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class FusedLinear:
    """y = concat(layer(x) for layer in layers), as one matmul over the base weights plus
    each LoRA layer's low-rank branch, kept in sync with the layers: if a base weight is
    replaced or updated in place (training, merge, dtype change), the fused copy is
    rebuilt on the next call. Adapter weights are read live on every call."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.bases: list[nn.Linear] = [base_linear(layer) for layer in layers]  # type: ignore[misc]
        self.sizes = [base.out_features for base in self.bases]
        self.source: tuple | None = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.prepacked = False
        self.adapter_source: tuple | None = None
        self.adapters: tuple[torch.Tensor, torch.Tensor] | None = None  # (stacked A^T, block-diagonal B^T)
        self.native_adapters: list[torch.Tensor] | None = None  # self.adapters packed by decode_lora_pack
        self.checked_in: object | None = None  # the weights_frozen() block in which this copy was checked
        self.current_adapters: tuple[torch.Tensor, torch.Tensor] | None = None  # live_adapters() when checked
        self.native = None  # the native module when its decode kernel holds the weight

    # The fused weight is derived data (and an opaque oneDNN tensor that cannot be
    # copied or pickled): copies start without it and rebuild it on first use.
    def __getstate__(self) -> dict:
        return {"layers": self.layers}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["layers"])  # type: ignore[misc]

    def __deepcopy__(self, memo: dict) -> FusedLinear:
        return FusedLinear([copy.deepcopy(layer, memo) for layer in self.layers])

    def source_key(self) -> tuple:
        return tuple((base.weight.data_ptr(), base.weight._version, base.weight.dtype)
                     for base in self.bases)

    def rebuild(self) -> None:
        weight = torch.cat([base.weight.detach() for base in self.bases])
        biases = [base.bias for base in self.bases]
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.cat([
                b.detach() if b is not None else weight.new_zeros(base.out_features)
                for b, base in zip(biases, self.bases)
            ])
        self.native = None
        if weight.device.type == "cpu" and weight.dtype == torch.bfloat16:
            self.native = native_kernel("decode_linear")
        self.prepacked = self.native is None and can_prepack(weight)
        if self.native is not None:
            weight = self.native.decode_linear_pack(weight)
        elif self.prepacked:
            # The batch-size hint only tunes the packing; any batch size works.
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
        self.weight = weight

    def ensure_current(self) -> None:
        """Rebuild the fused copy if a layer's weight or adapter changed (once per
        weights_frozen() block, else on every call)."""
        token = _FrozenWeights.token
        if token is None or self.checked_in is not token:
            key = self.source_key()
            if key != self.source:
                self.rebuild()
                self.source = key
            self.current_adapters = self.live_adapters()
            self.checked_in = token

    def native_linear(self) -> object:
        """The native kernel's operands (self.native set): the weights and adapters of the
        last ensure_current(), as a callable native DecodeLinear."""
        lora = self.native_adapters if self.current_adapters is not None else []
        return self.native.DecodeLinear(self.weight, sum(self.sizes), self.bias, lora)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The concatenated outputs for x [rows <= DECODE_ROWS, in], by the native kernel."""
        return self.native_linear()(x.contiguous())

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(layer(x) for layer in self.layers), computed together."""
        self.ensure_current()
        # Flatten to 2-D: a 3-D bf16 input can fall into a slow bmm over an expanded weight.
        flat = x.reshape(-1, x.shape[-1])
        adapters = self.current_adapters
        if self.native is not None and flat.shape[0] <= DECODE_ROWS:
            outs = list(self.decode(flat).split(self.sizes, dim=1))
        else:
            if self.native is not None:
                # Many rows (prefill, scoring): compute-bound matmuls on the layers' own weights.
                outs = [F.linear(flat, base.weight, base.bias) for base in self.bases]
            elif self.prepacked:
                outs = [torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")]
            else:
                outs = [F.linear(flat, self.weight, self.bias)]
            if adapters is not None:
                lora_at, lora_bt = adapters
                delta = torch.mm(torch.mm(flat.float(), lora_at), lora_bt)  # fp32 sum, one rounding
                for out, columns in zip(outs, delta.split([out.shape[1] for out in outs], dim=1)):
                    out.add_(columns)
            if len(outs) == 1:
                outs = list(outs[0].split(self.sizes, dim=1))
        return tuple(out.view(*x.shape[:-1], out.shape[-1]) for out in outs)

    def live_adapters(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """fp32 (the transpose of every active adapter's A stacked [in, sum r], the
        transpose of the block-diagonal scaling * B [sum r, sum out]); None when no layer
        has an active adapter."""
        active = [isinstance(layer, LoraLinear) and not layer.disabled for layer in self.layers]
        if not any(active):
            return None
        key = tuple((layer.lora_A.weight._version, layer.lora_A.weight.data_ptr(), layer.lora_B.weight._version,
                     layer.lora_B.weight.data_ptr(), layer.scaling) if on else None
                    for layer, on in zip(self.layers, active))
        if key != self.adapter_source:
            a_blocks, b_blocks = [], []
            for layer, on, base in zip(self.layers, active, self.bases):
                if on:
                    a_blocks.append(layer.lora_A.weight.detach().float())
                    b_blocks.append(layer.lora_B.weight.detach().float() * layer.scaling)
                else:  # a layer without an adapter: zero rows in the output of the branch
                    b_blocks.append(torch.zeros(base.out_features, 0, device=base.weight.device))
            self.adapters = torch.cat(a_blocks).t().contiguous(), torch.block_diag(*b_blocks).t().contiguous()
            self.adapter_source = key
            self.native_adapters = None
        if self.native is not None and self.native_adapters is None:
            ranks = [layer.lora_A.weight.shape[0] if on else 0 for layer, on in zip(self.layers, active)]
            self.native_adapters = self.native.decode_lora_pack(*self.adapters, ranks, self.sizes)
        return self.adapters


def base_linear(layer: nn.Module) -> nn.Linear | None:
    """The plain nn.Linear whose weight a layer's output is built on, if it can fuse:
    a Linear itself, or the base of an unmerged, non-DoRA LoRA layer. Quantized
    layers keep their own forward."""
    if type(layer) is nn.Linear:
        return layer
    return layer.plain_base if isinstance(layer, LoraLinear) else None


def never_fuse(model: nn.Module) -> None:
    """No fused copies for `model`'s layers. For weights that are rewritten in place
    without a new version: FSDP2 all-gathers each unsharded weight into storage it frees
    after the forward and reallocates for the next, preserving the version counter, often
    at the same address, so a copy keyed on (address, version) would silently go stale."""
    for module in model.modules():
        module.__dict__["_fused_for_inference"] = None


def fused_for_inference(owner: nn.Module, name: str, layers: list[nn.Module]) -> FusedLinear | None:
    """The FusedLinear over `layers`, cached on `owner` under `name`; None if they cannot fuse.

    The cache is kept outside the module's parameters and buffers (it is derived data,
    not state) and is rebuilt when any of the layers is swapped for another module.
    """
    fused = owner.__dict__.setdefault("_fused_for_inference", {})
    if fused is None:
        return None  # never_fuse(owner)
    cached = fused.get(name)
    token = _FrozenWeights.token
    if cached is not None and token is not None and cached.checked_in is token:
        return cached  # checked in this weights_frozen() block: no layer was swapped since
    if any(base_linear(layer) is None for layer in layers):
        fused.pop(name, None)  # free a stale fused copy
        return None
    if cached is None or any(a is not b for a, b in zip(cached.layers, layers)):
        cached = fused[name] = FusedLinear(layers)
    return cached

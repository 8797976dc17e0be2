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
the adapters add their low-rank branch on top, so generation during GRPO uses the
adapter weights with no merge and no copy of the base. The adapters of a group run
as two small fp32 matmuls over their stacked A matrices and a block-diagonal B
(scaling folded in): one rank-16 branch per layer in bf16, added into a column slice
of the output, had made LoRA generation 2x slower than the plain model (bf16
matmuls with K = 16 take a slow path on CPU).

Where Thrifty's native decoding matmul runs (CPUs with AVX-512 BF16), decoding-sized
batches go through kernels/csrc/decode_linear.cpp instead: weights streamed in blocks of 32
columns through the AMX tile unit (or the vector units where there is none), with the
LoRA branch accumulated into the same sums. Bigger batches (prefill, scoring) then
multiply by the layers' own weights, compute-bound there, so no second packed copy of
the weights is kept.

On a CPU without AVX-512, PyTorch multiplies bf16 with a slow generic kernel (16 rows
against a [8960, 1536] weight: 53 ms, AMD EPYC Milan). There a plan makes no copy at all:
decoding-sized batches go through kernels/portable_csrc/bf16_matvec.cpp, which widens
the layers' own bf16 weights to float32 in registers (8.5 ms at 16 rows where MKL took
19 ms on a float32 copy, measured in one run: half the bytes, and none of the copy's
memory, which was 6 GiB for a 1.5B model), bigger batches through float32 panels of
them (kernels/matmul.float32_mm); the products are rounded once to bf16, as oneDNN's
bf16 kernels round (float32 sums, one rounding).

A plan may instead hold the base weights quantized to GGUF blocks (Q8_0, Q4_0: GRPO's
`rollout_quantization`), multiplied by kernels/gguf_blocks.py: a quarter to an eighth of
the bytes a decoding step streams, and a quarter to an eighth of the memory the copy
takes. The LoRA branch stays in float32 on top.

A FusedLinear computes with its layers' weights of one weights epoch (copied, or read in
place where it keeps no copy), made by an InferencePlan (inference_plan.py), which
decides when it is current; nothing here checks whether the layers changed since.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.kernels import gguf_blocks
from thrifty.kernels.matmul import bf16_gemm_is_native, float32_mm, in_float32
from thrifty.kernels.native import native_kernel
from thrifty.layers.lora import LoraLinear

# Rows up to which the native decode kernel runs (it was 0.5-1.4x oneDNN's speed at 100+),
# and the bf16 matvec (1.2-1.4x MKL's float32 product at 64 rows on an AMD EPYC Milan).
DECODE_ROWS = 64


def can_prepack(weight: torch.Tensor) -> bool:
    # oneDNN's bf16 packing needs AVX-512 (BW/VL/DQ); on an AVX2-only CPU (AMD Zen 3) it raises.
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and bf16_gemm_is_native()
    )


@dataclass
class BasePack:
    """The base weights of a group, concatenated (and packed for the kernel that will
    read them): what a new weights epoch that left the frozen weights alone can reuse."""

    weight: torch.Tensor | None  # [sum out, in], or its native / oneDNN packing, or GGUF blocks
    bias: torch.Tensor | None
    native: ModuleType | None  # the native module when its decode kernel holds the weight
    prepacked: bool  # oneDNN's blocked layout
    widened: bool  # bf16 layers read where they lie, products in float32 (no native bf16 products here)
    qtype: int | None = None  # the GGUF block type of a quantized weight
    in_features: int = 0

    @classmethod
    def build(cls, bases: list[nn.Linear], quantization: str | None = None) -> BasePack:
        """quantization: None (the layers' dtype), or a name in gguf_blocks.QUANTIZE_TO."""
        bias = None
        if any(base.bias is not None for base in bases):
            bias = torch.cat([base.bias.detach() if base.bias is not None
                              else base.weight.new_zeros(base.out_features) for base in bases])
        in_features = bases[0].in_features
        # A row that is not whole blocks (32 values) stays in its dtype: never in a real
        # model's projections, but in tiny test models. Each layer is quantized on its own
        # (no concatenated float copy of the group first).
        if quantization is not None and in_features % gguf_blocks.BLOCK_VALUES == 0:
            qtype = gguf_blocks.QUANTIZE_TO[quantization]
            blocks = torch.cat([gguf_blocks.quantize(base.weight, qtype) for base in bases])
            return cls(blocks, bias, None, False, False, qtype, in_features)
        if in_float32(bases[0].weight):  # nothing to copy: the layers' weights are read as they are
            return cls(None, None if bias is None else bias.float(), None, False, True)
        weight = torch.cat([base.weight.detach() for base in bases])
        native = None
        if weight.device.type == "cpu" and weight.dtype == torch.bfloat16:
            native = native_kernel("decode_linear")
        prepacked = native is None and can_prepack(weight)
        if native is not None:
            weight = native.decode_linear_pack(weight)
        elif prepacked:
            # The batch-size hint only tunes the packing; any batch size works.
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
        return cls(weight, bias, native, prepacked, False)


class FusedLinear:
    """y = concat(layer(x) for layer in layers), as one matmul over the base weights plus
    each LoRA layer's low-rank branch, with the weights the layers had when it was made."""

    def __init__(self, layers: list[nn.Module], base: BasePack | None = None,
                 quantization: str | None = None) -> None:
        self.layers = layers
        self.bases: list[nn.Linear] = [base_linear(layer) for layer in layers]  # type: ignore[misc]
        self.sizes = [b.out_features for b in self.bases]
        self.base = base if base is not None else BasePack.build(self.bases, quantization)
        self.adapters = stacked_adapters(layers, self.bases)  # (stacked A^T, block-diagonal B^T) or None
        self.native_op = None  # the native DecodeLinear over base and adapters
        if self.base.native is not None:
            lora = []
            if self.adapters is not None:
                ranks = [layer.lora_A.weight.shape[0] if _active_lora(layer) else 0 for layer in layers]
                lora = self.base.native.decode_lora_pack(*self.adapters, ranks, self.sizes)
            self.native_op = self.base.native.DecodeLinear(self.base.weight, sum(self.sizes), self.base.bias, lora)

    @property
    def native(self) -> ModuleType | None:
        return self.base.native

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(layer(x) for layer in self.layers), computed together."""
        # Flatten to 2-D: a 3-D bf16 input can fall into a slow bmm over an expanded weight.
        flat = x.reshape(-1, x.shape[-1])
        base = self.base
        if self.native_op is not None and flat.shape[0] <= DECODE_ROWS:
            outs = list(self.native_op(flat.contiguous()).split(self.sizes, dim=1))
        else:
            if base.qtype is not None:
                outs = [gguf_blocks.matmul(flat, base.weight, base.qtype, base.in_features)]
                if base.bias is not None:
                    outs[0].add_(base.bias)
            elif base.native is not None:
                # Many rows (prefill, scoring): compute-bound matmuls on the layers' own weights.
                outs = [F.linear(flat, b.weight, b.bias) for b in self.bases]
            elif base.prepacked:
                outs = [torch.ops.mkldnn._linear_pointwise(flat, base.weight, base.bias, "none", [], "")]
            elif base.widened:
                outs = [_widened_product(flat, b.weight) for b in self.bases]
                if base.bias is not None:
                    for out, bias in zip(outs, base.bias.split(self.sizes)):
                        out.add_(bias)
            else:
                outs = [F.linear(flat, base.weight, base.bias)]
            if self.adapters is not None:
                lora_at, lora_bt = self.adapters
                delta = torch.mm(torch.mm(flat.float(), lora_at), lora_bt)  # fp32 sum, one rounding
                for out, columns in zip(outs, delta.split([out.shape[1] for out in outs], dim=1)):
                    out.add_(columns)
            if base.widened:
                outs = [out.to(x.dtype) for out in outs]
            if len(outs) == 1:
                outs = list(outs[0].split(self.sizes, dim=1))
        return tuple(out.view(*x.shape[:-1], out.shape[-1]) for out in outs)


def _widened_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T in float32 for a bf16 weight on a CPU without native bf16 products."""
    kernel = native_kernel("bf16_matvec")
    if kernel is not None and x.shape[0] <= DECODE_ROWS:
        return kernel.bf16_matvec(x.float(), weight.detach().contiguous())
    return float32_mm(x, weight.detach().t())


def _active_lora(layer: nn.Module) -> bool:
    return isinstance(layer, LoraLinear) and not layer.disabled


def stacked_adapters(layers: list[nn.Module], bases: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fp32 (the transpose of every active adapter's A stacked [in, sum r], the transpose
    of the block-diagonal scaling * B [sum r, sum out]); None when no layer has an active
    adapter."""
    if not any(_active_lora(layer) for layer in layers):
        return None
    a_blocks, b_blocks = [], []
    for layer, base in zip(layers, bases):
        if _active_lora(layer):
            a_blocks.append(layer.lora_A.weight.detach().float())
            b_blocks.append(layer.lora_B.weight.detach().float() * layer.scaling)
        else:  # a layer without an adapter: zero rows in the output of the branch
            b_blocks.append(torch.zeros(base.out_features, 0, device=base.weight.device))
    return torch.cat(a_blocks).t().contiguous(), torch.block_diag(*b_blocks).t().contiguous()


def base_linear(layer: nn.Module) -> nn.Linear | None:
    """The plain nn.Linear whose weight a layer's output is built on, if it can fuse:
    a Linear itself, or the base of an unmerged, non-DoRA LoRA layer. Quantized
    layers keep their own forward."""
    if type(layer) is nn.Linear:
        return layer
    return layer.plain_base if isinstance(layer, LoraLinear) else None

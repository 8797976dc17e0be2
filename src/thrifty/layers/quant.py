"""Weight-only quantization of a frozen base model: NF4 (QLoRA) and int8, in plain PyTorch.

NF4 follows QLoRA / bitsandbytes exactly (`quantize_4bit(quant_type="nf4",
blocksize=64, compress_statistics=True)`), so the numbers are the ones PEFT users
get on a GPU, but nothing here needs bitsandbytes or CUDA:

* weights are flattened row-major and cut into blocks of 64; each block is scaled
  by its absolute maximum and every value becomes the index of the nearest of the
  16 NF4 code values; two 4-bit indices share a byte, the first in the high nibble;
* double quantization: the fp32 absmax of each block, minus their mean, is itself
  quantized to 8 bits with bitsandbytes' dynamic (signed, tree) code in blocks of
  256, so the scales cost ~1/64 byte per weight instead of 4/64.

Resident weight memory is then ~0.516 byte per parameter (0.5 + 1/64 + 4/(64*256))
against 2 for bf16. Layers dequantize to the activation dtype inside forward and
again inside backward (for the input gradient), so a full dequantized copy of the
model never lives in memory at once, not even in autograd's saved tensors.

Int8 is per-output-channel symmetric absmax (1 byte per parameter + one scale per
row); on CPU with bf16 activations and a handful of rows it runs through
`torch._weight_int8pack_mm`, which reads int8 weights directly.

Every floating-point statistic is stored as the int32 bit pattern of an fp32 value
(see `_float_bits`), so `model.to(torch.bfloat16)` moves but never rounds them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.errors import ThriftyError
from thrifty.kernels import matmul

# The NormalFloat4 code (QLoRA, Dettmers et al. 2023, appendix E; bitsandbytes
# get_4bit_type("nf4")): quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0.
NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

NF4_BLOCKSIZE = 64
ABSMAX_BLOCKSIZE = 256  # bitsandbytes' blocksize for the second (double) quantization

# _weight_int8pack_mm beats dequantize + matmul only for bf16 activations with a few
# rows (measured, 2 threads, 1536x576 weight: 3x faster at 1 row, equal at ~8 rows,
# 10x slower at 512 rows; always slower for fp32). Decoding is where it matters.
INT8PACK_MAX_ROWS = 8


def dynamic_code_8bit(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit code (`create_dynamic_map(signed)`): 256 sorted values
    in [-1, 1] (signed; double quantization's code for the absmax values, and 8-bit AdamW's
    for its first moment) or [0, 1] (8-bit AdamW's second moment), dense near zero
    (exponent) with a linear fraction per decade."""
    values: list[float] = []
    for i in range(7):  # 7 exponent bits: decades 1e-6 .. 1
        boundaries = torch.linspace(0.1, 1, 2**i + 1 if signed else 2 ** (i + 1) + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values += ((10 ** (-6 + i)) * means).tolist()
        if signed:
            values += (-(10 ** (-6 + i)) * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))  # the unsigned code has 255 values; bitsandbytes pads with 0
    return torch.tensor(sorted(values), dtype=torch.float32)


def _float_bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> its int32 bit pattern; `Module.to(dtype)` leaves integer buffers alone."""
    return t.to(torch.float32).contiguous().view(torch.int32)


def _bits_float(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.float32)


def blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad `flat` with zeros to whole blocks -> (blocks [n_blocks, blocksize], absmax [n_blocks]).
    Zero padding never raises a block's absmax, so the last (partial) block is scaled
    exactly as bitsandbytes scales its remainder block."""
    pad = (-flat.numel()) % blocksize
    blocks = (F.pad(flat, (0, pad)) if pad else flat).view(-1, blocksize)
    # max(max, -min): no |blocks| temporary (and 4x faster than aminmax on CPU).
    return blocks, torch.maximum(blocks.amax(dim=1), -blocks.amin(dim=1))


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of a sorted code (ties go up, as bitsandbytes' bucketize)."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints).to(torch.uint8)


def _nf4_indices(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 code index for values in [-1, 1]; equal to nearest_code(scaled, NF4)
    (that is, bitsandbytes' bucketize) but ~4x faster on CPU, where bucketize's binary
    search mispredicts on every element (~40 ns each).

    A 4096-cell table gives the index for each cell's lower edge; cells (width 1/2048)
    are far narrower than the gaps between NF4 midpoints (>= 0.08), so at most one
    midpoint lies in a cell and one comparison on each side makes the result exact,
    even when float rounding puts a value in the neighbouring cell.
    """
    cells = 4096
    device = scaled.device
    midpoints = (lambda c: (c[:-1] + c[1:]) / 2)(torch.tensor(NF4_CODE, device=device))
    edges = torch.arange(cells, dtype=torch.float64, device=device) / cells * 2 - 1
    table = torch.bucketize(edges, midpoints.double()).to(torch.int32)
    inf = torch.tensor([float("inf")], device=device)
    below = torch.cat((-inf, midpoints))  # below[i]: the midpoint under code i
    above = torch.cat((midpoints, inf))  # above[i]: the midpoint over code i
    cell = ((scaled + 1) * (cells / 2)).to(torch.int32).clamp_(0, cells - 1)
    index = table.index_select(0, cell)  # int32 indices: index_select's fast path
    down = scaled <= below.index_select(0, index)
    up = scaled > above.index_select(0, index)
    return (index.to(torch.uint8) - down.view(torch.uint8)) + up.view(torch.uint8)


@dataclass
class NF4Weight:
    """A weight matrix in NF4: what an NF4Linear keeps instead of its fp weight."""

    packed: torch.Tensor  # uint8 [ceil(n/2)], 2 codes per byte, element 2i in the high nibble
    absmax: torch.Tensor  # fp32 [blocks], or uint8 [blocks] codes when double-quantized
    shape: tuple[int, ...]
    blocksize: int = NF4_BLOCKSIZE
    absmax_scale: torch.Tensor | None = None  # fp32 [ceil(blocks/256)] (double quant only)
    absmax_offset: torch.Tensor | None = None  # fp32 [1]: mean absmax subtracted before quantizing

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def nbytes(self) -> int:
        tensors = [self.packed, self.absmax, self.absmax_scale, self.absmax_offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def quantize_nf4(
    weight: torch.Tensor,
    blocksize: int = NF4_BLOCKSIZE,
    double_quant: bool = True,
) -> NF4Weight:
    """Quantize a weight to NF4 as bitsandbytes `quantize_4bit(..., quant_type="nf4")`."""
    flat = weight.detach().reshape(-1).to(torch.float32)
    blocks, absmax = blockwise_absmax(flat, blocksize)
    # bitsandbytes also clamps to [-1, 1]; rounding can only overshoot by an ulp, which
    # maps to the same end code, so the clamp pass is skipped.
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
    codes = _nf4_indices(scaled.reshape(-1)[: flat.numel()])
    if codes.numel() % 2:  # pad with the code of 0.0, as bitsandbytes does
        codes = F.pad(codes, (0, 1), value=NF4_CODE.index(0.0))
    packed = (codes[0::2] << 4) | codes[1::2]
    q = NF4Weight(packed=packed, absmax=absmax, shape=tuple(weight.shape), blocksize=blocksize)
    if double_quant:
        # bitsandbytes compress_statistics=True: centre the scales, then 8-bit blockwise.
        offset = absmax.mean()
        centred = absmax - offset
        scale_blocks, scale_absmax = blockwise_absmax(centred, ABSMAX_BLOCKSIZE)
        scaled_absmax = (scale_blocks * (1.0 / scale_absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1)
        q.absmax = nearest_code(scaled_absmax.reshape(-1)[: absmax.numel()], dynamic_code_8bit().to(flat.device))
        q.absmax_scale = scale_absmax
        q.absmax_offset = offset.reshape(1)
    return q


def dequantize_absmax(q: NF4Weight, code_8bit: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 per-block scales of `q` (undoing double quantization if used)."""
    if not q.double_quant:
        return q.absmax.to(torch.float32)
    code = dynamic_code_8bit().to(q.absmax.device) if code_8bit is None else code_8bit
    # index_select with int32 indices: ~20x faster on CPU than code[q.absmax.long()].
    values = code.index_select(0, q.absmax.to(torch.int32))
    pad = (-values.numel()) % ABSMAX_BLOCKSIZE
    values = F.pad(values, (0, pad)).view(-1, ABSMAX_BLOCKSIZE) * q.absmax_scale.unsqueeze(1)
    return values.reshape(-1)[: q.absmax.numel()] + q.absmax_offset


def nf4_pair_table(device: torch.device | str | None = None) -> torch.Tensor:
    """int64 [256]: for each packed byte, the two fp32 NF4 values it holds (high nibble
    first) as one 64-bit pattern. Gathering one int64 per byte with index_select is ~4x
    faster on CPU than gathering rows of a [256, 2] float table, and ~15x faster than
    unpacking nibbles and indexing twice."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    index = torch.arange(256, device=device)
    pairs = torch.stack((code[index >> 4], code[index & 15]), dim=1).contiguous()
    return pairs.view(torch.int64).view(256)


def dequantize_nf4(
    q: NF4Weight,
    dtype: torch.dtype = torch.float32,
    pair_table: torch.Tensor | None = None,
    code_8bit: torch.Tensor | None = None,
) -> torch.Tensor:
    """NF4 -> weight of q.shape in `dtype`. Computed in fp32 and rounded once at the end,
    as bitsandbytes does, so bf16 results are the correctly rounded NF4 values."""
    table = nf4_pair_table(q.packed.device) if pair_table is None else pair_table
    numel = math.prod(q.shape)
    values = table.index_select(0, q.packed.to(torch.int32)).view(torch.float32)
    absmax = dequantize_absmax(q, code_8bit).unsqueeze(1)
    blocks = absmax.numel() * q.blocksize
    if values.numel() == blocks == numel:
        # The normal case (in_features % 64 == 0): scale and round to `dtype` in one pass.
        out = torch.empty(q.shape, dtype=dtype, device=values.device)
        torch.mul(values.view(-1, q.blocksize), absmax, out=out.view(-1, q.blocksize))
        return out
    values = F.pad(values, (0, blocks - values.numel())).view(-1, q.blocksize) * absmax
    return values.reshape(-1)[:numel].view(q.shape).to(dtype)


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """x @ W.T for a frozen quantized W that autograd must not keep dequantized.

    Plain F.linear on a dequantized weight would save that weight for backward: one
    full-precision copy of every layer alive until the backward pass, which is exactly
    the memory QLoRA exists to avoid. Here backward dequantizes again instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.layer.input_grad(grad), None


class QuantizedLinear(nn.Module):
    """What the frozen quantized linear layers (NF4Linear, Int8Linear, and GGUFLinear in
    gguf_quant.py) share: the nn.Linear-like surface and forward."""

    method: str  # "nf4", "int8", "gguf": how the weight is stored
    in_features: int
    out_features: int
    compute_dtype: torch.dtype  # dtype of the weight before quantization

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """x2d @ W.T"""
        raise NotImplementedError

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """grad @ W: the gradient of matmul's input."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Always 2-D: a 3-D bf16 matmul can fall into a slow bmm on CPU (DESIGN.md).
        x2d = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and x2d.requires_grad:
            out = _FrozenQuantizedMatmul.apply(x2d, self)
        else:
            out = self.matmul(x2d)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight (for merging / export)."""
        dtype = dtype or self.compute_dtype
        weight = self.dequantize(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class NF4Linear(QuantizedLinear):
    """A frozen Linear whose weight is stored in NF4 (QLoRA) and dequantized on the fly.

    Resident weight memory: in*out/2 bytes of codes + in*out/64 bytes of 8-bit scales
    (+4 bytes per 256 scales) with double quantization, in*out/16 without.
    """

    method = "nf4"

    def __init__(self, q: NF4Weight, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        super().__init__()
        if len(q.shape) != 2:
            raise ThriftyError(f"NF4Linear needs a 2-D weight, got shape {q.shape}.")
        self.out_features, self.in_features = q.shape
        self.blocksize = q.blocksize
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_packed", q.packed)
        if q.double_quant:
            self.register_buffer("absmax", q.absmax)  # uint8 codes
            self.register_buffer("absmax_scale", _float_bits(q.absmax_scale))
            self.register_buffer("absmax_offset", _float_bits(q.absmax_offset))
            self.register_buffer("code_8bit", _float_bits(dynamic_code_8bit().to(q.absmax.device)), persistent=False)
        else:
            self.register_buffer("absmax", _float_bits(q.absmax))
            self.absmax_scale = self.absmax_offset = self.code_8bit = None
        self.register_buffer("pair_table", nf4_pair_table(q.packed.device), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True) -> NF4Linear:
        q = quantize_nf4(linear.weight, blocksize=blocksize, double_quant=double_quant)
        return cls(q, linear.bias, linear.weight.dtype)

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def quantized_weight(self) -> NF4Weight:
        if self.double_quant:
            return NF4Weight(self.weight_packed, self.absmax, (self.out_features, self.in_features),
                             self.blocksize, _bits_float(self.absmax_scale), _bits_float(self.absmax_offset))
        return NF4Weight(self.weight_packed, _bits_float(self.absmax), (self.out_features, self.in_features),
                         self.blocksize)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        code = None if self.code_8bit is None else _bits_float(self.code_8bit)
        return dequantize_nf4(self.quantized_weight(), dtype or self.compute_dtype, self.pair_table, code)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        return matmul.mm(x2d, self.dequantize(x2d.dtype).t())

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return matmul.mm(grad, self.dequantize(grad.dtype))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric absmax int8: (int8 [out, in], fp32 scales [out])."""
    w = weight.detach().to(torch.float32)
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(QuantizedLinear):
    """A frozen Linear with int8 weights and one fp32 scale per output row.
    Resident weight memory: in*out bytes + 4*out."""

    method = "int8"

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("scales", _float_bits(scales))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scales = quantize_int8(linear.weight)
        return cls(q, scales, linear.bias, linear.weight.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        scales = _bits_float(self.scales)
        return (self.weight_int8.to(torch.float32) * scales.unsqueeze(1)).to(dtype or self.compute_dtype)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        scales = _bits_float(self.scales).to(x2d.dtype)
        if (x2d.dtype == torch.bfloat16 and x2d.device.type == "cpu"
                and x2d.shape[0] <= INT8PACK_MAX_ROWS and hasattr(torch, "_weight_int8pack_mm")):
            return torch._weight_int8pack_mm(x2d.contiguous(), self.weight_int8, scales)
        # (x @ q.T) * s instead of x @ (q * s).T: int8 -> bf16 is exact, and scaling the
        # [rows, out] result skips an fp32 weight temporary (1.5x faster at 512 rows,
        # same error: the bf16 rounding of the result dominates).
        return matmul.mm(x2d, self.weight_int8.to(x2d.dtype).t()) * scales

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        scales = _bits_float(self.scales).to(grad.dtype)
        return matmul.mm(grad * scales, self.weight_int8.to(grad.dtype))


QUANTIZED_LINEAR_TYPES = (QuantizedLinear,)


QuantMethod = Literal["nf4", "int8"]


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QUANTIZED_LINEAR_TYPES)


def quantization_of(model: nn.Module) -> str | None:
    """How `model`'s quantized layers store their weights ("nf4", "int8" or "gguf"), or
    None if it has none."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            return module.method
    return None


def _matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    # Whole dotted components only: "mlp" matches "model.layers.0.mlp.up_proj", "lm" matches nothing.
    return any(f".{p}." in f".{name}." for p in patterns)


def quantize_model(
    model: nn.Module,
    method: QuantMethod = "nf4",
    skip: tuple[str, ...] | list[str] = ("lm_head",),
    *,
    blocksize: int = NF4_BLOCKSIZE,
    double_quant: bool = True,
) -> nn.Module:
    """Replace every nn.Linear except those in `skip` (module names or name components,
    e.g. "lm_head", "mlp") by a frozen NF4Linear / Int8Linear, in place.

    Quantize first, then apply LoRA: the adapters wrap the quantized layers (QLoRA).
    By default that is every projection of the decoder layers; the output head stays
    in full precision (it is usually tied to the embedding, and its precision matters
    most for the logits).
    """
    if method not in ("nf4", "int8"):
        raise ThriftyError(f"quantize method {method!r} is not supported: use 'nf4' (QLoRA) or 'int8'.")
    # LoRA wraps quantized layers, so this layer sits below it and knows a LoRA layer by its
    # lora_A, as PEFT's own checks do.
    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise ThriftyError("quantize_model: the model already has LoRA adapters. Quantize the base "
                           "model first, then call apply_lora (that is QLoRA).")
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and not _matches(name, tuple(skip))]
    for name, linear in targets:
        if embed is not None and linear.weight is embed.weight:
            raise ThriftyError(f"quantize_model: {name!r} shares its weight with the token embedding "
                               f"(tied embeddings); quantizing it would keep two copies. Add "
                               f"{name.rsplit('.', 1)[-1]!r} to skip.")
        if method == "nf4":
            new: nn.Module = NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant)
        else:
            new = Int8Linear.from_linear(linear)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def weight_memory_bytes(model: nn.Module, under: str = "") -> int:
    """Resident bytes of the base model's weights (parameters and persistent buffers),
    counting tied tensors once and leaving LoRA parameters out.

    under: only count tensors whose name starts with this prefix, e.g. "model.layers"
    for the decoder stack (the part quantize_model replaces).
    """
    seen: set[int] = set()
    total = 0
    for module_name, module in model.named_modules():
        tensors = list(module.named_parameters(recurse=False))
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        tensors += [(n, b) for n, b in module.named_buffers(recurse=False) if n not in non_persistent]
        for name, t in tensors:
            full = f"{module_name}.{name}" if module_name else name
            if not full.startswith(under) or ".lora_" in f".{full}":
                continue
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total

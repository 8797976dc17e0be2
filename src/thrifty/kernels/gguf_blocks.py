"""Matmuls with weights kept in GGUF's own quantized blocks (Q4_0/1, Q5_0/1, Q8_0, Q4_K,
Q5_K, Q6_K): the one door to portable_csrc/gguf_blocks.cpp, with numpy's dequantizer (the
`gguf` package) beside it where the kernels cannot be built.

* A few rows (decoding): each block is unpacked in registers (Q4_K, Q6_K: multiplied
  with the input rows quantized to int16, exact integer sums; the other types:
  dequantized to float32 32 values at a time) and multiplied with every input row, so
  the weight streams from memory at its quantized size (4.5 bits a value for Q4_K
  against bf16's 16); nothing the size of the weight is ever made.
* Many rows (prefill, scoring, training): panels of PANEL_ROWS weight rows are
  dequantized to the dtype the products are taken in (the activations' dtype, or float32
  where bf16 products are not native: kernels/matmul.py) and multiplied by oneDNN, panel
  by panel into one panel buffer, each product written into its slice of one result
  buffer; the panel is the only dequantized copy alive (tens of MB, not the model) and
  one product allocates two buffers, not two per panel (a list of products joined at the
  end left the heap more fragmented: 0.3 GB more RSS after a 1.5B model's training forward).
"""

from __future__ import annotations

from collections.abc import Iterator

import gguf
import numpy as np
import torch

from thrifty.kernels.matmul import in_float32
from thrifty.kernels.native import native_kernel

# Input rows up to which the dequantize-and-dot kernel runs; beyond, dequantized panels
# feed oneDNN's matmul, which reuses each weight for many rows.
MATVEC_ROWS = 16
PANEL_ROWS = 512

# What each block type holds: (values, bytes) per block.
BLOCK_LAYOUTS = {int(t): gguf.GGML_QUANT_SIZES[t] for t in (
    gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q5_0,
    gguf.GGMLQuantizationType.Q5_1, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_K,
    gguf.GGMLQuantizationType.Q5_K, gguf.GGMLQuantizationType.Q6_K)}


# Block types a float weight can be quantized to here (gguf's numpy quantizers, ~0.2 s per
# 14M weights), by the names llama.cpp's files use.
QUANTIZE_TO = {"q8_0": int(gguf.GGMLQuantizationType.Q8_0), "q4_0": int(gguf.GGMLQuantizationType.Q4_0)}
BLOCK_VALUES = 32  # values per block of both


# Rows quantized at once: the quantizer's float32 temporaries, several times the rows'
# size, stay tens of MB (whole, a 1.5B model's head made a GiB of them).
QUANTIZE_ROWS = 1024


def quantize(weight: torch.Tensor, qtype: int) -> torch.Tensor:
    """Blocks [rows, bytes per row] of a float weight [rows, in_features], as llama.cpp's
    reference quantizer makes them."""
    out = torch.empty(weight.shape[0], row_bytes(qtype, weight.shape[1]), dtype=torch.uint8)
    for start in range(0, weight.shape[0], QUANTIZE_ROWS):
        rows = weight[start:start + QUANTIZE_ROWS].detach().to(torch.float32).cpu().numpy()
        out[start:start + rows.shape[0]] = torch.from_numpy(
            gguf.quants.quantize(rows, gguf.GGMLQuantizationType(qtype)))
    return out


def row_bytes(qtype: int, in_features: int) -> int:
    values, nbytes = BLOCK_LAYOUTS[qtype]
    return in_features // values * nbytes


def dequantize(blocks: torch.Tensor, qtype: int, in_features: int, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, in_features] in dtype from blocks [rows, bytes per row], written into `out`
    (contiguous, that shape and dtype) when given."""
    module = native_kernel("gguf_blocks")
    if module is not None and dtype in (torch.float32, torch.bfloat16) and blocks.device.type == "cpu":
        if out is None:
            out = torch.empty(blocks.shape[0], in_features, dtype=dtype)
        module.gguf_dequantize(blocks.contiguous(), qtype, out)
        return out
    values = gguf.quants.dequantize(blocks.cpu().numpy(), gguf.GGMLQuantizationType(qtype))
    result = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(blocks.device, dtype)
    return result if out is None else out.copy_(result)


def _panels(blocks: torch.Tensor, qtype: int, in_features: int,
            dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, dequantized panel) for each PANEL_ROWS rows of the weight, every panel
    written into one buffer: one allocation per product, not one per panel (below glibc's
    mmap threshold the freed panels fragmented the heap, above it each panel's pages were
    faulted in again)."""
    buffer = torch.empty(min(PANEL_ROWS, blocks.shape[0]), in_features, dtype=dtype, device=blocks.device)
    for start in range(0, blocks.shape[0], PANEL_ROWS):
        part = blocks[start:start + PANEL_ROWS]
        yield start, dequantize(part, qtype, in_features, dtype, out=buffer[:part.shape[0]])


def matmul(x: torch.Tensor, blocks: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
    """x [n, in] @ W^T -> [n, out] in x's dtype, W [out, in] in blocks."""
    module = native_kernel("gguf_blocks")
    if module is not None and x.shape[0] <= MATVEC_ROWS and x.device.type == "cpu":
        return module.gguf_matvec(x.contiguous(), blocks, qtype)
    dtype = _product_dtype(x)
    rows = x.to(dtype)
    out = torch.empty(x.shape[0], blocks.shape[0], dtype=dtype, device=x.device)
    for start, panel in _panels(blocks, qtype, in_features, dtype):
        torch.mm(rows, panel.t(), out=out[:, start:start + panel.shape[0]])
    return out.to(x.dtype)


def input_grad(grad: torch.Tensor, blocks: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
    """grad [n, out] @ W -> [n, in]: the gradient of matmul's input, panel by panel, the
    panels' products summed in float32 and rounded once to grad's dtype."""
    dtype = _product_dtype(grad)
    total = torch.zeros(grad.shape[0], in_features, dtype=torch.float32, device=grad.device)
    for start, panel in _panels(blocks, qtype, in_features, dtype):
        part = grad[:, start:start + panel.shape[0]].to(dtype)
        if dtype == torch.float32:
            total.addmm_(part, panel)
        else:
            total += part @ panel
    return total.to(grad.dtype)


def _product_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 where bf16 products are not native (kernels/matmul.py), else x's dtype."""
    return torch.float32 if in_float32(x) else x.dtype

"""Frozen layers whose weights stay in a GGUF file's own quantized blocks.

A Q4_K_M file holds a 1.5B model in 1.1 GB; dequantized to bf16 it needs 3.1 GB. These
layers keep the file's blocks (the bytes of the file, mapped, not copied, when they come
from the loader) and multiply through kernels/gguf_blocks.py, which dequantizes a row or
a panel at a time inside the matmul. As the frozen base under LoRA adapters (QLoRA on
the file you have), the forward and the input gradient both read the blocks; nothing
keeps a dequantized copy for backward.
"""

from __future__ import annotations

import torch
from torch import nn

from thrifty.errors import ThriftyError
from thrifty.kernels import gguf_blocks
from thrifty.layers.quant import QuantizedLinear


def check_blocks(blocks: torch.Tensor, qtype: int, in_features: int, name: str) -> None:
    if qtype not in gguf_blocks.BLOCK_LAYOUTS:
        raise ThriftyError(f"{name}: GGUF type {qtype} is not one Thrifty multiplies from blocks.")
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != gguf_blocks.row_bytes(qtype, in_features):
        raise ThriftyError(f"{name}: blocks of shape {tuple(blocks.shape)} do not hold rows of {in_features} values.")


class GGUFLinear(QuantizedLinear):
    """y = x W^T (+ b) with W [out, in] in GGUF blocks [out, bytes per row]."""

    method = "gguf"

    def __init__(self, blocks: torch.Tensor, qtype: int, in_features: int, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype) -> None:
        super().__init__()
        check_blocks(blocks, qtype, in_features, "GGUFLinear")
        self.qtype = int(qtype)
        self.in_features, self.out_features = in_features, blocks.shape[0]
        self.compute_dtype = compute_dtype
        self.register_buffer("blocks", blocks)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        return gguf_blocks.matmul(x2d, self.blocks, self.qtype, self.in_features)

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return gguf_blocks.input_grad(grad, self.blocks, self.qtype, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return gguf_blocks.dequantize(self.blocks, self.qtype, self.in_features, dtype or self.compute_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", qtype={self.qtype}"


class GGUFEmbedding(nn.Module):
    """nn.Embedding over GGUF blocks: only the looked-up rows are dequantized."""

    def __init__(self, blocks: torch.Tensor, qtype: int, embedding_dim: int, compute_dtype: torch.dtype) -> None:
        super().__init__()
        check_blocks(blocks, qtype, embedding_dim, "GGUFEmbedding")
        self.qtype = int(qtype)
        self.num_embeddings, self.embedding_dim = blocks.shape[0], embedding_dim
        self.compute_dtype = compute_dtype
        self.register_buffer("blocks", blocks)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.blocks.index_select(0, ids.reshape(-1))
        values = gguf_blocks.dequantize(rows, self.qtype, self.embedding_dim, self.compute_dtype)
        return values.view(*ids.shape, self.embedding_dim)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return gguf_blocks.dequantize(self.blocks, self.qtype, self.embedding_dim, dtype or self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"

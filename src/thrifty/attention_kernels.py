"""Which SDPA kernel attention uses in training, chosen by sequence length.

On CPU, PyTorch picks its flash-attention kernel whenever it can, but for short
training sequences its backward is slow: measured with torch 2.13, bf16, 9 query /
3 kv heads of 64, explicit mask, forward+backward: 8x64 tokens 14 ms flash vs 6 ms
math, 8x128 29 vs 22, 4x192 even, 4x256 20 vs 28 (2 threads; 1 thread alike). SFT
examples are often short (the shipped example: ~55 tokens), so attention was ~30%
of the step until short batches went to the math kernel.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# Up to this many tokens per row the math kernel wins on CPU (crossover ~192).
MATH_KERNEL_MAX_LENGTH = 160


def training_attention_kernel(seq_len: int, device: torch.device) -> ContextManager[None]:
    """A context for the forward pass (backward follows the forward's choice)."""
    if device.type == "cpu" and seq_len <= MATH_KERNEL_MAX_LENGTH:
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()

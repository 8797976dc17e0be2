"""Matrix products of frozen, dequantized weights, where the CPU decides how to take them.

On a CPU without AVX-512 (AMD Zen 3, many laptops), PyTorch multiplies bf16 matrices
with a slow generic kernel, slowest when the right operand is not transposed: measured
[512, 1536] @ [1536, 576] at 663 ms in bf16 against 28 ms in float32 (AMD EPYC Milan,
2 threads). There the product runs in float32 and is rounded once to bf16, which is
also what oneDNN's bf16 kernels compute (float32 sums, one rounding).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def bf16_gemm_is_native() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX-512 or newer)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D operands of one dtype, in that dtype."""
    if a.dtype == torch.bfloat16 and a.device.type == "cpu" and not bf16_gemm_is_native():
        return torch.mm(a.float(), b.float()).to(torch.bfloat16)
    return a @ b


def addmm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c + a @ b, rounded once to the operands' dtype (c broadcasts like torch.addmm's)."""
    if a.dtype == torch.bfloat16 and a.device.type == "cpu" and not bf16_gemm_is_native():
        return torch.addmm(c.float(), a.float(), b.float()).to(torch.bfloat16)
    return torch.addmm(c, a, b)

"""Attention kernels on CPU: training, and generation's decoding steps.

With bf16 weights on a CPU with AVX-512 BF16, training attention runs Thrifty's C++
forward and backward (kernels/csrc/attention_forward.cpp, kernels/csrc/attention_backward.cpp):
PyTorch's own CPU flash backward is 7x its forward and was ~25% of a LoRA SFT step.
Measured at 4 x 512 tokens, 9 query / 3 kv heads of 64: 17-20 ms against 50-56 ms.
Both visit only the 64-key blocks a 64-query block sees at all: GRPO rows
([prompt | completion 1 | ...], grpo/batches.py) hide most of them. At 4 x 576 GRPO
rows (8 completions of ~60 tokens per row), per call: forward 4.5 ms against PyTorch's
11.9, backward ~10 ms against ~19 before the block table. GRPO now lays several groups
end to end in one row, so both kernels also split each head's query blocks over the
threads (a row's 9 heads alone would leave threads idle).

Otherwise (another CPU, float32, no compiler) PyTorch picks the kernel: on CPU its
flash attention whenever it can, but for short training sequences that backward is
slow: measured with torch 2.13, bf16, 9 query / 3 kv heads of 64, explicit mask,
forward+backward: 8x64 tokens 14 ms flash vs 6 ms math, 8x128 29 vs 22, 4x192 even,
4x256 20 vs 28 (2 threads; 1 thread alike). SFT examples are often short (the
shipped example: ~55 tokens), so attention was ~30% of the step until short batches
went to the math kernel. The native backward beats both at every length (forward +
backward, same shapes, causal: 8x64 3.7 ms vs math 5.2, 8x128 7.8 vs 19.5, 4x512 29
vs flash 115), so with it the math kernel is never chosen.

Decoding steps (one query per row, no gradients) run kernels/csrc/decode_attention.cpp:
PyTorch's flash attention took ~320 us per layer there, for about a MFLOP of work.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from thrifty.kernels.matmul import in_float32
from thrifty.kernels.native import native_kernel

# Up to this many tokens per row the math kernel wins on CPU (crossover ~192).
MATH_KERNEL_MAX_LENGTH = 160


def _pytorch_training_kernel(q: torch.Tensor) -> ContextManager[None]:
    """Short training sequences on CPU to PyTorch's math kernel (see above); backward
    follows the forward's choice, and a checkpointed layer's recomputation makes the same
    one from the same shapes."""
    training = torch.is_grad_enabled() and q.requires_grad
    if training and q.device.type == "cpu" and q.shape[2] <= MATH_KERNEL_MAX_LENGTH:
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """SDPA over [batch, heads, seq, head_dim] with grouped kv heads; `mask` is boolean
    [batch, 1, queries, keys], True where a query may attend; scores scaled by `scale`
    (None: head_dim^-1/2)."""
    result = attention_with_logsumexp(q, k, v, mask, is_causal, scale=scale)
    if result is not None:
        return result[0]
    if q.shape[2] == 1 and _native_decode_applies(q, k, v):
        return native_kernel("decode_attention").decode_attention(q, k, v, mask, _scale(q, scale))
    # PyTorch's CPU attention multiplies bf16 with the slow generic kernel where bf16
    # products are not native (kernels/matmul.py): there it runs on float32 copies of
    # q, k, v and its output is rounded once to bf16.
    dtype = torch.float32 if in_float32(q) else q.dtype
    with _pytorch_training_kernel(q):
        out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask,
                                             is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1], scale=scale)
    return out.to(q.dtype)


def attention_with_logsumexp(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
    known: tuple[torch.Tensor, torch.Tensor] | None = None, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(output, logsumexp) of training attention through the native backward, or None
    where it does not apply. `known`: the (output, logsumexp) of an earlier forward of
    the same inputs, as in a checkpointed layer's recomputation (activation_checkpointing.py):
    the node is rebuilt without running the forward kernel."""
    if not _native_backward_applies(q, k) or (is_causal and q.shape[2] != k.shape[2]):
        return None
    return _FlashAttentionNativeBackward.apply(q, k, v, mask, is_causal, known, _scale(q, scale))


def _native_backward_applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    return (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad) and q.device.type == "cpu"
            and q.dtype == torch.bfloat16 and q.shape[-1] % 16 == 0
            and native_kernel("attention_backward") is not None)


def _native_decode_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """A decoding step (one query per row) without gradients, in bf16 on this CPU."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    module = native_kernel("decode_attention") if q.device.type == "cpu" and q.dtype == torch.bfloat16 else None
    return module is not None and module.decode_attention_supports(q.shape[-1])


class _FlashAttentionNativeBackward(torch.autograd.Function):
    """kernels/csrc/attention_forward.cpp's forward (PyTorch's CPU flash-attention forward where
    the module lacks it); the backward of kernels/csrc/attention_backward.cpp."""

    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, known, scale):  # type: ignore[no-untyped-def]
        module = native_kernel("attention_forward")
        if module is not None:  # the backward reads its inputs in the layout the forward takes
            q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        if known is not None:
            out, logsumexp = (t.detach() for t in known)  # new tensors: apply() attaches this node
        elif module is not None:
            out, logsumexp = module.attention_forward(q, k, v, mask, is_causal, scale)
        else:
            out, logsumexp = _pytorch_flash_forward(q, k, v, mask, is_causal, scale)
        ctx.save_for_backward(q, k, v, out, logsumexp, mask)
        ctx.is_causal, ctx.scale = is_causal, scale
        ctx.mark_non_differentiable(logsumexp)
        return out, logsumexp

    @staticmethod
    def backward(ctx, grad_out, _grad_logsumexp):  # type: ignore[no-untyped-def]
        q, k, v, out, logsumexp, mask = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = native_kernel("attention_backward").attention_backward(
            grad_out, q, k, v, out, logsumexp, mask, ctx.is_causal, ctx.scale)
        batch, heads, _, head_dim = q.shape
        kv_heads, keys = k.shape[1], k.shape[2]

        def per_kv_head(grad: torch.Tensor) -> torch.Tensor:
            # [batch, heads * parts, head_dim, padded keys] float -> [batch, kv_heads, keys, head_dim]
            grad = grad.view(batch, kv_heads, -1, head_dim, grad.shape[-1]).sum(2)
            return grad[..., :keys].transpose(-1, -2).to(q.dtype)

        return grad_q, per_kv_head(grad_k), per_kv_head(grad_v), None, None, None, None


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _pytorch_flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                           is_causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, logsumexp) of PyTorch's CPU flash attention, in the form the native backward takes."""
    additive = None
    if mask is not None:  # what SDPA does with a boolean mask
        additive = torch.zeros(mask.shape, dtype=q.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=additive, scale=scale)
    return out, logsumexp

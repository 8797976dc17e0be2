"""AdamW with 8-bit moments, as bitsandbytes' `AdamW8bit` defines them.

Each moment is stored as one byte per element: blocks of 256 elements share a float32
scale (the block's largest magnitude), and each element is the index of the nearest value
of a 256-entry "dynamic" code (an exponent and a shrinking fraction, so small values keep
relative precision: Dettmers et al., 8-bit Optimizers via Block-wise Quantization). The
first moment uses the signed code, the second (never negative) the unsigned one. Tensors
with fewer than 4096 elements keep float32 moments, as bitsandbytes' `min_8bit_size`.

Each step dequantizes a tensor's moments, applies Adam's update in float32 with
bitsandbytes' formulas and quantizes them again, one tensor at a time (a C++ pass where
it could be built), so the float32 copy exists for one tensor only: 2 bytes of state per
parameter instead of 8. On a CPU there is
no paging (a CUDA unified-memory feature), so `paged_adamw_8bit` is this same optimizer.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from thrifty.kernels.native import native_kernel
from thrifty.layers.quant import blockwise_absmax, dynamic_code_8bit, nearest_code

BLOCK = 256
MIN_8BIT_SIZE = 4096


class BlockwiseCode:
    """Block-wise quantization of float32 tensors to the indices of one dynamic code."""

    def __init__(self, signed: bool) -> None:
        self.code = dynamic_code_8bit(signed)

    def quantize(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 indices shaped as `values`, float32 scale per block of 256)."""
        blocks, absmax = blockwise_absmax(values.reshape(-1), BLOCK)
        # As bitsandbytes: multiply by the reciprocal, clamp to the code's range. An
        # all-zero block has scale 0 and stores the index of 0.
        normalized = (blocks * torch.where(absmax > 0, 1.0 / absmax, 0.0)[:, None]).clamp_(-1, 1)
        indices = nearest_code(normalized, self.code)
        return indices.reshape(-1)[: values.numel()].reshape(values.shape), absmax

    def dequantize(self, indices: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        blocks, _ = blockwise_absmax(self.code[indices.reshape(-1).long()], BLOCK)
        return (blocks * absmax[:, None]).reshape(-1)[: indices.numel()].reshape(indices.shape)


class AdamW8bit(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit on CPU tensors: the same state layout (`state1`/`state2`
    uint8 with `absmax1`/`absmax2`, or float32 below MIN_8BIT_SIZE elements), the same
    update formulas (bitsandbytes' CPU kernels), decoupled weight decay.

    One difference: a bf16 weight keeps a bf16 low half in its state (`low`), so that
    weight + low holds the weight to 16 bits of mantissa and updates below bf16's
    resolution accumulate instead of being rounded away (bitsandbytes rounds each
    updated bf16 weight, losing them). It stands in for a float32 master copy at half
    its size: 2 + 2 + 2 bytes per weight (weight, low half, moments) instead of 2 + 4 + 2."""

    def __init__(self, params: Any, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 use_kernel: bool = True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.codes = (BlockwiseCode(signed=True), BlockwiseCode(signed=False))
        # The portable C++ step (one pass per tensor, ~10x faster), where it could be built.
        self.kernel = native_kernel("adamw_8bit") if use_kernel else None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Not torch's: it casts every floating state tensor to its parameter's dtype, which
        # would round a bf16 weight's float32 moments to bf16 (and turn the bytes to floats).
        super().load_state_dict({**state_dict, "state": {}})
        numbered = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            self.state[numbered[int(index)]] = {key: value.clone() if isinstance(value, torch.Tensor) else value
                                                for key, value in saved.items()}

    @torch.no_grad()
    def step(self, closure: Any = None, grad_scale: float = 1.0) -> None:
        """One update; the gradients are multiplied by grad_scale as they are read (the
        run's clipping factor), so no scaled copy of them is made."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, grad_scale)

    def _update(self, p: torch.Tensor, group: dict[str, Any], grad_scale: float) -> None:
        state = self.state[p]
        eight_bit = p.numel() >= MIN_8BIT_SIZE
        if not state:
            state["step"] = 0
            if eight_bit:
                blocks = -(-p.numel() // BLOCK)
                for k in ("state1", "state2"):
                    state[k] = torch.zeros(p.shape, dtype=torch.uint8)
                state["absmax1"], state["absmax2"] = torch.zeros(blocks), torch.zeros(blocks)
            else:
                state["state1"], state["state2"] = torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(
                    p, dtype=torch.float32)
            if p.dtype == torch.bfloat16:
                state["low"] = torch.zeros_like(p)
        state["step"] += 1
        step, lr, wd, eps = state["step"], group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        low = state.get("low")
        if eight_bit and self.kernel is not None and p.is_contiguous() and p.dtype in (torch.float32, torch.bfloat16):
            self.kernel.adamw_8bit_step(p, low, p.grad.contiguous(), grad_scale, state["state1"], state["state2"],
                                        state["absmax1"], state["absmax2"], self.codes[0].code, self.codes[1].code,
                                        beta1, beta2, eps, step, lr, wd)
            return
        grad = p.grad.float() * grad_scale if grad_scale != 1.0 else p.grad.float()
        weights = p.float() if low is None else p.float() + low.float()  # p itself when float32
        correction1 = 1.0 - beta1**step
        correction2 = math.sqrt(1.0 - beta2**step)
        if eight_bit:
            signed, unsigned = self.codes
            m = signed.dequantize(state["state1"], state["absmax1"])
            v = unsigned.dequantize(state["state2"], state["absmax2"])
        else:
            m, v = state["state1"], state["state2"]
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        if wd > 0.0:
            weights.mul_(1.0 - lr * wd)
        if eight_bit:  # bitsandbytes' two kernels write the same update two ways
            weights.addcdiv_(m, (v.sqrt() / correction2).add_(eps), value=-lr / correction1)
            state["state1"], state["absmax1"] = signed.quantize(m)
            state["state2"], state["absmax2"] = unsigned.quantize(v)
        else:
            weights.add_(m / (v.sqrt() + eps * correction2), alpha=-lr * correction2 / correction1)
        if weights is not p:
            p.copy_(weights)
        if low is not None:
            low.copy_(weights - p.float())

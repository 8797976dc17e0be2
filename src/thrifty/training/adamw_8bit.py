"""AdamW with 8-bit moments, as bitsandbytes' `AdamW8bit` defines them.

Each moment is stored as one byte per element: blocks of 256 elements share a float32
scale (the block's largest magnitude), and each element is the index of the nearest value
of a 256-entry "dynamic" code (an exponent and a shrinking fraction, so small values keep
relative precision: Dettmers et al., 8-bit Optimizers via Block-wise Quantization). The
first moment uses the signed code, the second (never negative) the unsigned one. Tensors
with fewer than 4096 elements keep float32 moments, as bitsandbytes' `min_8bit_size`.

Each step dequantizes a tensor's moments, applies Adam's update in float32 with
bitsandbytes' formulas and quantizes them again, one tensor at a time, so the float32 copy
exists for one tensor only: 2 bytes of state per parameter instead of 8. On a CPU there is
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
    update formulas (bitsandbytes' CPU kernels), decoupled weight decay."""

    def __init__(self, params: Any, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 use_kernel: bool = True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.codes = (BlockwiseCode(signed=True), BlockwiseCode(signed=False))
        # The portable C++ step (one pass per tensor, ~10x faster), where it could be built.
        self.kernel = native_kernel("adamw_8bit") if use_kernel else None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts every floating parameter's state to the parameter's dtype, the
        # byte-coded moments too; their values are 0..255, so casting back is exact.
        for state in self.state.values():
            if "absmax1" in state:
                state["state1"], state["state2"] = state["state1"].to(torch.uint8), state["state2"].to(torch.uint8)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
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
        state["step"] += 1
        step, lr, wd, eps = state["step"], group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        grad = p.grad.float()
        weights = p.float()  # a copy unless p is float32, as in bitsandbytes; written back below
        if eight_bit and self.kernel is not None and weights is p and p.is_contiguous():
            self.kernel.adamw_8bit_step(p, grad.contiguous(), state["state1"], state["state2"], state["absmax1"],
                                        state["absmax2"], self.codes[0].code, self.codes[1].code, beta1, beta2, eps,
                                        step, lr, wd)
            return
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

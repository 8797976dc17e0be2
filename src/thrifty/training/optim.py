"""AdamW whose weights and state are float32, whatever dtype the model trains in.

LoRA adapters are float32 already (thrifty.layers.lora), so for LoRA/QLoRA this is plain
torch AdamW. For full fine-tuning in bfloat16 it keeps a float32 master copy of every
trainable weight: an update of lr * m/sqrt(v) ~ 1e-5 * |w| is below bf16's resolution
(8 bits of mantissa, ~4e-3 relative), so AdamW applied to bf16 weights directly would
mostly round the update away. The model keeps computing in bf16; after each step the
masters are rounded into it. With `eight_bit` the moments are bitsandbytes' block-wise
8-bit ones (training/adamw_8bit.py): 2 bytes of state per weight instead of 8, and a bf16
weight's master is a bf16 low half (16 bits of mantissa in all) instead of a float32 copy.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from thrifty.errors import ThriftyError
from thrifty.training.adamw_8bit import AdamW8bit
from thrifty.training.distributed import full_tensor, shard_like


class NonFiniteGradients(ThriftyError):
    """The gradients' norm is NaN or infinite: no update was applied."""

    def __init__(self, norm: float) -> None:
        super().__init__(f"the gradient norm is {norm}; no update was applied.")
        self.norm = norm


class MasterWeightAdamW:
    """AdamW over `params` with fp32 masters for the non-fp32 ones.

    One call per optimizer step: `grad_norm = opt.step(max_grad_norm)` gathers the
    gradients (in fp32), clips them to max_grad_norm (0: no clipping), updates and
    writes the new weights back into the model; then `zero_grad()`.
    Weight decay skips 1-D parameters (norm weights, biases), as transformers' Trainer.
    """

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, eight_bit: bool = False) -> None:
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        self.masters: list[torch.Tensor] = []
        seen: set[int] = set()
        for name, p in named_params:
            if not p.requires_grad or id(p) in seen:
                continue  # tied weights appear once
            seen.add(id(p))
            self.names.append(name)
            self.params.append(p)
            # fp32 params are their own master; others get an fp32 copy, except with 8-bit
            # moments, where a bf16 low half in the optimizer's state stands in for it.
            self.masters.append(p if p.dtype == torch.float32 or eight_bit
                                else p.detach().float().clone().requires_grad_(True))
        if not self.params:
            raise ValueError("no trainable parameters: nothing to optimise.")
        decay = [m for m, p in zip(self.masters, self.params) if p.ndim >= 2]
        no_decay = [m for m, p in zip(self.masters, self.params) if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        # foreach=False: the per-tensor loop gives the same bits whatever the grouping,
        # and on CPU it is no slower for the few hundred tensors of a LoRA model.
        self.optimizer: torch.optim.Optimizer = (
            AdamW8bit(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay) if eight_bit
            else torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False))

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def step(self, max_grad_norm: float) -> float:
        """Clip, update, copy back; returns the gradient norm before clipping."""
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None  # free the low-precision copy at once: 2 bytes/param less at the peak
        grads = [m.grad for m in self.masters if m.grad is not None]
        if not grads:
            return 0.0
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32)
                                                     for g in grads]))
        norm_value = float(full_tensor(norm))  # FSDP2: the ranks' shards' norms combined
        if not math.isfinite(norm_value):
            raise NonFiniteGradients(norm_value)
        # As torch.nn.utils.clip_grad_norm_: scale down only when above the limit.
        factor = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0) if max_grad_norm > 0 else None
        if isinstance(self.optimizer, AdamW8bit):  # scales the (bf16) gradients as it reads them
            self.optimizer.step(grad_scale=1.0 if factor is None else float(factor))
        else:
            for g in grads if factor is not None else ():
                g.mul_(factor)
            self.optimizer.step()
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m)
        return norm_value

    def zero_grad(self) -> None:
        for p, m in zip(self.params, self.masters):
            p.grad = None
            m.grad = None

    def state_dict(self) -> dict[str, Any]:
        """Whole tensors, also when FSDP2 shards them (every rank must call it then)."""
        masters = {name: full_tensor(m.detach()).clone() for name, m, p in zip(self.names, self.masters, self.params)
                   if m is not p}
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {index: {key: full_tensor(value) if isinstance(value, torch.Tensor) and value.dim()
                                      else value for key, value in state.items()}
                              for index, state in optimizer["state"].items()}
        return {"optimizer": optimizer, "masters": masters, "names": list(self.names)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["names"] != self.names:
            raise ValueError("the checkpoint's optimizer was built for different trainable parameters.")
        optimizer = dict(state["optimizer"])
        # Under FSDP2, each rank keeps its piece of the (whole) saved moments. (torch numbers
        # the parameters group by group.)
        numbered = [m for group in self.optimizer.param_groups for m in group["params"]]
        optimizer["state"] = {index: {key: shard_like(value, numbered[int(index)])
                                      if isinstance(value, torch.Tensor) and value.dim() else value
                                      for key, value in saved.items()}
                              for index, saved in optimizer["state"].items()}
        self.optimizer.load_state_dict(optimizer)
        for name, m, p in zip(self.names, self.masters, self.params):
            if m is not p:
                m.copy_(shard_like(state["masters"][name], m))
                p.copy_(m)

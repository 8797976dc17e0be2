"""Turn a loaded model into the thing a trainer trains: full, LoRA or QLoRA.

Shared by the SFT and GRPO trainers; `config` is any object with the method fields
of SFTConfig (use_lora, lora_r, lora_alpha, lora_dropout, lora_target_modules,
use_rslora, use_dora, quantize).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn

from thrifty.errors import ThriftyError
from thrifty.layers.lora import LoraConfig, LoraLinear, apply_lora, lora_layers
from thrifty.layers.quant import is_quantized, quantize_model


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) at once."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lora_config_from(config: Any) -> LoraConfig:
    target = config.lora_target_modules
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(target) if isinstance(target, (list, tuple)) else target,
                      use_rslora=config.use_rslora, use_dora=config.use_dora)


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_layers(model))


def prepare_model(model: nn.Module, config: Any) -> nn.Module:
    """Quantize the base (if asked) and add LoRA adapters (if asked), in place; or, for
    full fine-tuning, make every weight trainable. A model that already has LoRA
    layers (e.g. from load_adapter, to continue training) is trained as it is.

    Call after seeding: the LoRA A matrices are initialised from torch's RNG.
    """
    if isinstance(getattr(model, "lm_head", None), (LoraLinear,)) or is_quantized(getattr(model, "lm_head", nn.Identity())):
        raise ThriftyError("the output head (lm_head) has a LoRA adapter or is quantized; the trainer's chunked "
                           "loss needs a plain lm_head. Leave lm_head out of lora_target_modules.")
    if has_lora(model):
        return model
    if config.use_lora:
        if config.quantize is not None:
            if any(is_quantized(m) for m in model.modules()):
                pass  # quantized already (e.g. by the caller)
            else:
                quantize_model(model, config.quantize)
        apply_lora(model, lora_config_from(config))  # freezes the base, adapters trainable
        return model
    quantized = [name for name, m in model.named_modules() if is_quantized(m)]
    if quantized:
        raise ThriftyError(f"full fine-tuning (use_lora: false) cannot train quantized layers such as "
                           f"{quantized[0]!r}; load the model unquantized or set use_lora: true.")
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def method_name(model: nn.Module, quantize: str | None) -> str:
    """How a run trains, for logs and plot titles: LoRA, QLoRA (nf4) or full fine-tuning."""
    if not has_lora(model):
        return "full fine-tuning"
    return f"QLoRA ({quantize})" if quantize else "LoRA"

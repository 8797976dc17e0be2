"""Turn a loaded model into the thing a trainer trains: full, LoRA or QLoRA.

How a run trains is decided once (`decide_method`), from the config and the model as
it arrives (it may be quantized already, or carry adapters, when it comes through the
Unsloth / PEFT names), and applied once (`prepare_model`). `config` is any object with
the method fields of SFTConfig (use_lora, lora_r, lora_alpha, lora_dropout,
lora_target_modules, use_rslora, use_dora, quantize, adapter).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from thrifty.errors import ThriftyError
from thrifty.layers.gguf_quant import GGUFLinear
from thrifty.layers.lora import LoraConfig, LoraLinear, apply_lora, has_lora
from thrifty.layers.quant import is_quantized, quantization_of, quantize_model


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


@dataclass(frozen=True)
class TrainingMethod:
    """What a run trains: adapters (LoRA, over a base stored as `quantize` says) or every weight."""

    use_lora: bool
    quantize: str | None  # "nf4" / "int8": QLoRA's frozen base; None: the base as loaded

    @property
    def name(self) -> str:
        """For logs and plot titles."""
        if not self.use_lora:
            return "full fine-tuning"
        return f"QLoRA ({self.quantize})" if self.quantize else "LoRA"


def decide_method(model: nn.Module, config: Any) -> TrainingMethod:
    """The method for `config` and `model` as given: a model that carries adapters
    already trains them; a base quantized already keeps its quantization (and a config
    that asks for another one is refused)."""
    head = getattr(model, "lm_head", nn.Identity())
    stored = quantization_of(model)
    if isinstance(head, LoraLinear) or (is_quantized(head) and not isinstance(head, GGUFLinear)):
        raise ThriftyError("the output head (lm_head) has a LoRA adapter or is quantized; the trainer's chunked "
                           "loss needs a plain lm_head. Leave lm_head out of lora_target_modules.")
    if config.quantize == "gguf" and stored != "gguf":
        raise ThriftyError("quantize: gguf trains on a GGUF file's own blocks: set model_name_or_path to a .gguf file "
                           "(loaded with quantize='gguf' in Python), or use quantize: nf4.")
    if stored is not None and config.quantize not in (None, stored):
        raise ThriftyError(f"quantize: {config.quantize}, but the model's base is quantized as {stored} already; "
                           f"set quantize: {stored} or load the model unquantized.")
    use_lora = has_lora(model) or config.adapter is not None or config.use_lora
    if not use_lora and stored is not None:
        raise ThriftyError(f"full fine-tuning (use_lora: false) cannot train quantized ({stored}) layers; load "
                           "the model unquantized or set use_lora: true.")
    return TrainingMethod(use_lora=use_lora, quantize=stored or (config.quantize if use_lora else None))


def prepare_model(model: nn.Module, config: Any, method: TrainingMethod,
                  load_adapter: Callable[[nn.Module], None]) -> nn.Module:
    """Apply `method` to `model`, in place: quantize the base if asked, then train the
    adapters it carries, the ones `load_adapter` loads (config.adapter), or new ones; or
    make every weight trainable. Call after seeding: LoRA's A matrices are random."""
    if not method.use_lora:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method.quantize is not None and quantization_of(model) is None:
        quantize_model(model, method.quantize)  # QLoRA: the adapters wrap the quantized layers
    if has_lora(model):
        return model  # e.g. from get_peft_model: trained as they are
    if config.adapter is not None:
        load_adapter(model)
    else:
        apply_lora(model, lora_config_from(config))  # freezes the base, adapters trainable
    return model

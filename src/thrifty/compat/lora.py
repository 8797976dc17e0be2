"""PEFT's LoraConfig and get_peft_model, onto Thrifty's LoRA layers.

PEFT's names and defaults (r=8, lora_alpha=8, target_modules None = the model type's
default, q_proj and v_proj for the Llama family). The adapters Thrifty saves are PEFT's
format, so PEFT loads them and Thrifty loads PEFT's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from thrifty.compat.arguments import reject_unknown
from thrifty.compat.model import PreTrainedModel
from thrifty.errors import ThriftyError
from thrifty.layers.lora import LoraConfig as ThriftyLoraConfig
from thrifty.layers.lora import apply_lora

# PEFT's default target modules for the families Thrifty loads (peft's
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
DEFAULT_TARGETS = ["q_proj", "v_proj"]
# Fields PEFT has that change nothing here, at their defaults.
_INERT_DEFAULTS = {"fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": False,
                   "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None,
                   "loftq_config": None, "revision": None, "exclude_modules": None}


@dataclass
class LoraConfig:
    """PEFT's LoraConfig (the fields Thrifty implements; the others must stay at PEFT's defaults)."""

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    bias: str = "none"
    task_type: str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict, repr=False)  # the other PEFT fields given

    def __init__(self, r: int = 8, lora_alpha: float = 8, target_modules: list[str] | str | None = None,
                 lora_dropout: float = 0.0, bias: str = "none", task_type: Any = None, use_rslora: bool = False,
                 use_dora: bool = False, rank_pattern: dict[str, int] | None = None,
                 alpha_pattern: dict[str, float] | None = None, **options: Any) -> None:
        self.r, self.lora_alpha, self.target_modules = r, lora_alpha, target_modules
        self.lora_dropout, self.bias, self.use_rslora, self.use_dora = lora_dropout, bias, use_rslora, use_dora
        self.task_type = getattr(task_type, "value", task_type)  # PEFT's TaskType enum or its string
        self.rank_pattern, self.alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
        if self.task_type not in (None, "CAUSAL_LM"):
            raise ThriftyError(f"LoraConfig(task_type={self.task_type!r}): Thrifty trains causal language models; "
                               "use task_type='CAUSAL_LM'.")
        changed = {k: v for k, v in options.items() if k not in _INERT_DEFAULTS or v != _INERT_DEFAULTS[k]}
        reject_unknown("LoraConfig", changed, "r, lora_alpha, target_modules, lora_dropout, bias='none', "
                       "task_type, use_rslora, use_dora, rank_pattern, alpha_pattern")
        self.options = options
        self.thrifty()  # checks the values now, as PEFT does

    def thrifty(self) -> ThriftyLoraConfig:
        targets = DEFAULT_TARGETS if self.target_modules is None else self.target_modules
        return ThriftyLoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                                 target_modules=list(targets) if isinstance(targets, (list, tuple, set)) else targets,
                                 use_rslora=self.use_rslora, use_dora=self.use_dora, bias=self.bias,
                                 rank_pattern=self.rank_pattern, alpha_pattern=self.alpha_pattern)


def get_peft_model(model: PreTrainedModel, peft_config: LoraConfig, **kwargs: Any) -> PreTrainedModel:
    """Add LoRA adapters to `model` in place (the base frozen) and return it."""
    reject_unknown("get_peft_model", {k: v for k, v in kwargs.items() if k != "adapter_name" or v != "default"})
    if not isinstance(model, PreTrainedModel):
        raise ThriftyError("get_peft_model takes the model from thrifty.AutoModelForCausalLM.from_pretrained "
                           "(or FastLanguageModel); for Thrifty's own CausalLM use thrifty.layers.lora.apply_lora.")
    if not isinstance(peft_config, LoraConfig):
        raise ThriftyError(f"get_peft_model: peft_config must be thrifty.LoraConfig, got {type(peft_config).__name__}.")
    add_adapters(model, peft_config.thrifty())
    return model


def add_adapters(model: PreTrainedModel, config: ThriftyLoraConfig, seed: int | None = None) -> None:
    """apply_lora on the wrapped model (it refuses a model that has adapters already)."""
    if seed is not None:
        torch.manual_seed(seed)
    apply_lora(model.causal_lm, config)
    model.causal_lm.train()

"""Unsloth's FastLanguageModel, onto Thrifty: the notebook calls, same names and defaults.

    model, tokenizer = FastLanguageModel.from_pretrained("unsloth/SmolLM2-135M-Instruct", load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing="unsloth")
    ...
    FastLanguageModel.for_inference(model)

load_in_4bit is Thrifty's NF4 with double quantization (QLoRA), load_in_8bit its int8
weights, full_finetuning trains every weight (no adapters). use_gradient_checkpointing
(True or "unsloth") turns on the trainer's activation checkpointing.
"""

from __future__ import annotations

from typing import Any

from thrifty.compat.arguments import reject_unknown
from thrifty.compat.auto import load_pretrained
from thrifty.compat.lora import add_adapters
from thrifty.compat.model import PreTrainedModel
from thrifty.compat.tokenizer import PreTrainedTokenizer
from thrifty.errors import ThriftyError
from thrifty.layers.lora import LoraConfig

# Unsloth's default target modules: every projection of the decoder layers.
UNSLOTH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name: str | None = None, max_seq_length: int | None = 2048, dtype: Any = None,
                        load_in_4bit: bool = False, load_in_8bit: bool = False, full_finetuning: bool = False,
                        **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizer]:
        reject_unknown("FastLanguageModel.from_pretrained", kwargs, "model_name, max_seq_length, dtype, "
                       "load_in_4bit, load_in_8bit, full_finetuning")
        if load_in_4bit and load_in_8bit:
            raise ThriftyError("FastLanguageModel.from_pretrained: load_in_4bit and load_in_8bit are both set.")
        if full_finetuning and (load_in_4bit or load_in_8bit):
            raise ThriftyError("full_finetuning trains every weight, which a 4/8-bit base cannot be: drop "
                               "load_in_4bit / load_in_8bit, or train LoRA adapters with get_peft_model.")
        method = "nf4" if load_in_4bit else "int8" if load_in_8bit else None
        model, tokenizer = load_pretrained(model_name, dtype, method, max_seq_length=max_seq_length)
        if full_finetuning:
            model.causal_lm.requires_grad_(True).train()
        return model, tokenizer

    @staticmethod
    def get_peft_model(model: PreTrainedModel, r: int = 16, target_modules: list[str] | str | None = None,
                       lora_alpha: float = 16, lora_dropout: float = 0.0, bias: str = "none",
                       use_gradient_checkpointing: bool | str = "unsloth", random_state: int = 3407,
                       use_rslora: bool = False, loftq_config: Any = None, modules_to_save: Any = None,
                       **kwargs: Any) -> PreTrainedModel:
        reject_unknown("FastLanguageModel.get_peft_model",
                       {k: v for k, v in kwargs.items() if k not in ("max_seq_length", "use_dora") or
                        (k == "use_dora" and v)},
                       "r, target_modules, lora_alpha, lora_dropout, bias='none', use_gradient_checkpointing, "
                       "random_state, use_rslora")
        for name, value in (("loftq_config", loftq_config), ("modules_to_save", modules_to_save)):
            if value:
                raise ThriftyError(f"FastLanguageModel.get_peft_model: {name} is not supported by Thrifty; "
                                   "leave it None.")
        if not isinstance(model, PreTrainedModel):
            raise ThriftyError("get_peft_model takes the model FastLanguageModel.from_pretrained returned.")
        config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias, use_rslora=use_rslora,
                            target_modules=list(target_modules or UNSLOTH_TARGETS)
                            if not isinstance(target_modules, str) else target_modules)
        add_adapters(model, config, seed=random_state)
        model.gradient_checkpointing = bool(use_gradient_checkpointing)
        return model

    @staticmethod
    def for_inference(model: PreTrainedModel) -> PreTrainedModel:
        return model.eval()

    @staticmethod
    def for_training(model: PreTrainedModel, use_gradient_checkpointing: bool = True) -> PreTrainedModel:
        model.gradient_checkpointing = use_gradient_checkpointing
        return model.train()


def is_bf16_supported() -> bool:
    """Unsloth's helper: bfloat16 is what Thrifty trains in on every machine."""
    return True

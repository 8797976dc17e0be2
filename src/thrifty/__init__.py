"""Thrifty: fine-tune and run LLMs on the hardware you have.

The public names below load on first use (PEP 562), so `import thrifty.cli` and
`thrifty --help` answer without importing torch (~1.5 s), and a YAML config can be
checked before any model code loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CausalLM": "thrifty.model.decoder",
    "ModelConfig": "thrifty.model.config",
    "Tokenizer": "thrifty.model.tokenizer",
    "ThriftyError": "thrifty.errors",
    "load_model": "thrifty.formats.loader",
    "save_hf_model": "thrifty.formats.hf_export",
    "export_gguf": "thrifty.formats.gguf_export",
    "Completion": "thrifty.generation.engine",
    "generate": "thrifty.generation.engine",
    "SFTConfig": "thrifty.sft.config",
    "load_sft_config": "thrifty.sft.config",
    "GRPOConfig": "thrifty.grpo.config",
    "load_grpo_config": "thrifty.grpo.config",
    # the trainers take TRL's constructor as well as Thrifty's own (compat/trainers.py)
    "SFTTrainer": "thrifty.compat.trainers",
    "GRPOTrainer": "thrifty.compat.trainers",
    # the names of Unsloth, PEFT and transformers (compat/)
    "FastLanguageModel": "thrifty.compat.unsloth",
    "is_bf16_supported": "thrifty.compat.unsloth",
    "AutoModelForCausalLM": "thrifty.compat.auto",
    "AutoTokenizer": "thrifty.compat.auto",
    "BitsAndBytesConfig": "thrifty.compat.auto",
    "LoraConfig": "thrifty.compat.lora",
    "get_peft_model": "thrifty.compat.lora",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'thrifty' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # what type checkers and IDEs see
    from thrifty.compat.auto import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from thrifty.compat.lora import LoraConfig, get_peft_model
    from thrifty.compat.trainers import GRPOTrainer, SFTTrainer
    from thrifty.compat.unsloth import FastLanguageModel, is_bf16_supported
    from thrifty.errors import ThriftyError
    from thrifty.formats.gguf_export import export_gguf
    from thrifty.formats.hf_export import save_hf_model
    from thrifty.formats.loader import load_model
    from thrifty.generation.engine import Completion, generate
    from thrifty.grpo.config import GRPOConfig, load_grpo_config
    from thrifty.model.config import ModelConfig
    from thrifty.model.decoder import CausalLM
    from thrifty.model.tokenizer import Tokenizer
    from thrifty.sft.config import SFTConfig, load_sft_config

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
    "SFTTrainer": "thrifty.sft.trainer",
    "GRPOConfig": "thrifty.grpo.config",
    "load_grpo_config": "thrifty.grpo.config",
    "GRPOTrainer": "thrifty.grpo.trainer",
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
    from thrifty.errors import ThriftyError
    from thrifty.formats.gguf_export import export_gguf
    from thrifty.formats.hf_export import save_hf_model
    from thrifty.formats.loader import load_model
    from thrifty.generation.engine import Completion, generate
    from thrifty.grpo.config import GRPOConfig, load_grpo_config
    from thrifty.grpo.trainer import GRPOTrainer
    from thrifty.model.config import ModelConfig
    from thrifty.model.decoder import CausalLM
    from thrifty.model.tokenizer import Tokenizer
    from thrifty.sft.config import SFTConfig, load_sft_config
    from thrifty.sft.trainer import SFTTrainer

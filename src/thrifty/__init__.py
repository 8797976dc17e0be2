"""Thrifty: fine-tune and run LLMs on the hardware you have."""

from thrifty.model.config import ModelConfig
from thrifty.errors import ThriftyError
from thrifty.generation.engine import Completion, generate
from thrifty.grpo.config import GRPOConfig, load_grpo_config
from thrifty.grpo.trainer import GRPOTrainer
from thrifty.formats.loader import load_model
from thrifty.model.decoder import CausalLM
from thrifty.formats.hf_export import save_hf_model
from thrifty.sft.config import SFTConfig, load_sft_config
from thrifty.sft.trainer import SFTTrainer
from thrifty.model.tokenizer import Tokenizer

__all__ = ["CausalLM", "Completion", "GRPOConfig", "GRPOTrainer", "ModelConfig", "SFTConfig", "SFTTrainer", "ThriftyError", "Tokenizer",
           "generate", "load_grpo_config", "load_model", "load_sft_config", "save_hf_model"]
__version__ = "0.1.0"

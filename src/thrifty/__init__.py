"""Thrifty: fine-tune and run LLMs on the hardware you have."""

from thrifty.config import ModelConfig
from thrifty.errors import ThriftyError
from thrifty.generation import Completion, generate
from thrifty.grpo_config import GRPOConfig, load_grpo_config
from thrifty.grpo_trainer import GRPOTrainer
from thrifty.loading.loader import load_model
from thrifty.model import CausalLM
from thrifty.export import save_hf_model
from thrifty.sft_config import SFTConfig, load_sft_config
from thrifty.sft_trainer import SFTTrainer
from thrifty.tokenizer import Tokenizer

__all__ = ["CausalLM", "Completion", "GRPOConfig", "GRPOTrainer", "ModelConfig", "SFTConfig", "SFTTrainer", "ThriftyError", "Tokenizer",
           "generate", "load_grpo_config", "load_model", "load_sft_config", "save_hf_model"]
__version__ = "0.1.0"

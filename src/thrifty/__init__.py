"""Thrifty: fine-tune and run LLMs on the hardware you have."""

from thrifty.config import ModelConfig
from thrifty.errors import ThriftyError
from thrifty.generation import Completion, generate
from thrifty.loading.loader import load_model
from thrifty.model import CausalLM
from thrifty.tokenizer import Tokenizer

__all__ = ["CausalLM", "Completion", "ModelConfig", "ThriftyError", "Tokenizer", "generate", "load_model"]
__version__ = "0.1.0"

"""transformers' AutoModelForCausalLM, AutoTokenizer and BitsAndBytesConfig, onto load_model.

A name is what load_model takes: a local Hugging Face directory or .gguf file, a hub id
cached locally (Org/Name, resolved offline), or the built-in default model's name.
4-bit loading is Thrifty's NF4 (with bitsandbytes' double quantization when asked), 8-bit
its int8 weights; both are CPU code, so no bitsandbytes is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from thrifty.compat.arguments import notice, reject_unknown
from thrifty.compat.model import PreTrainedModel
from thrifty.compat.tokenizer import PreTrainedTokenizer
from thrifty.errors import ThriftyError
from thrifty.formats.default_model import resolve_model_path
from thrifty.formats.loader import load_model
from thrifty.model.tokenizer import Tokenizer


class BitsAndBytesConfig:
    """transformers' BitsAndBytesConfig, the fields that choose what Thrifty does."""

    def __init__(self, load_in_4bit: bool = False, load_in_8bit: bool = False, bnb_4bit_quant_type: str = "fp4",
                 bnb_4bit_use_double_quant: bool = False, bnb_4bit_compute_dtype: Any = None,
                 **kwargs: Any) -> None:
        inert = {"bnb_4bit_quant_storage", "llm_int8_threshold", "llm_int8_has_fp16_weight"}
        reject_unknown("BitsAndBytesConfig", {k: v for k, v in kwargs.items() if k not in inert},
                       "load_in_4bit, load_in_8bit, bnb_4bit_quant_type, bnb_4bit_use_double_quant, "
                       "bnb_4bit_compute_dtype")
        if load_in_4bit and load_in_8bit:
            raise ThriftyError("BitsAndBytesConfig: load_in_4bit and load_in_8bit are both set; choose one.")
        if bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ThriftyError(f"BitsAndBytesConfig: bnb_4bit_quant_type={bnb_4bit_quant_type!r}: use 'nf4'.")
        self.load_in_4bit, self.load_in_8bit = load_in_4bit, load_in_8bit
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bnb_4bit_use_double_quant
        self.bnb_4bit_compute_dtype = bnb_4bit_compute_dtype

    @property
    def method(self) -> str | None:
        return "nf4" if self.load_in_4bit else "int8" if self.load_in_8bit else None


def training_dtype(dtype: Any) -> torch.dtype:
    """transformers' dtype argument as Thrifty runs it: None/"auto" -> bfloat16; float16 ->
    bfloat16 (no float16 kernels on a CPU), with a notice."""
    if dtype in (None, "auto"):
        return torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype in ("float32", "bfloat16", "float16") else dtype
    if dtype == torch.float16:
        notice("float16 runs as bfloat16 here (no float16 kernels on a CPU; bfloat16 keeps float32's range).")
        return torch.bfloat16
    if dtype not in (torch.bfloat16, torch.float32):
        raise ThriftyError(f"dtype={dtype!r}: use torch.bfloat16, torch.float32 or 'auto'.")
    return dtype


def load_pretrained(name: str | Path | None, dtype: Any, quantization: str | None = None, *,
                    double_quant: bool = True, max_seq_length: int | None = None,
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizer]:
    path = resolve_model_path(None if name is None else str(name))
    model, tokenizer = load_model(path, dtype=training_dtype(dtype), quantize=quantization, double_quant=double_quant)
    wrapped = PreTrainedModel(model, tokenizer, None if name is None else str(name), max_seq_length)
    return wrapped, wrap_tokenizer(tokenizer, path, max_seq_length)


def wrap_tokenizer(tokenizer: Tokenizer, path: Path, max_seq_length: int | None = None) -> PreTrainedTokenizer:
    """transformers' tokenizer over Thrifty's, with the padding side and length limit of the
    model directory's tokenizer_config.json (at `path`, resolved) where it has them."""
    settings: dict[str, Any] = {}
    if (path / "tokenizer_config.json").is_file():
        settings = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    limit = settings.get("model_max_length")
    limit = max_seq_length or (limit if isinstance(limit, int) and limit < 10**9 else 2048)
    return PreTrainedTokenizer(tokenizer, padding_side=settings.get("padding_side", "right"), model_max_length=limit)


class AutoModelForCausalLM:
    @staticmethod
    def from_pretrained(pretrained_model_name_or_path: str | Path, *, torch_dtype: Any = None, dtype: Any = None,
                        quantization_config: BitsAndBytesConfig | None = None, **kwargs: Any) -> PreTrainedModel:
        reject_unknown("AutoModelForCausalLM.from_pretrained", kwargs, "torch_dtype / dtype, quantization_config")
        method, double_quant = None, True
        if quantization_config is not None:
            if not isinstance(quantization_config, BitsAndBytesConfig):
                raise ThriftyError("quantization_config must be thrifty.BitsAndBytesConfig.")
            method, double_quant = quantization_config.method, quantization_config.bnb_4bit_use_double_quant
            if quantization_config.load_in_4bit and quantization_config.bnb_4bit_quant_type == "fp4":
                notice("4-bit loading uses NF4 (QLoRA's type; Thrifty has no FP4).")
            dtype = dtype or torch_dtype or quantization_config.bnb_4bit_compute_dtype
        model, _ = load_pretrained(pretrained_model_name_or_path, dtype or torch_dtype, method,
                                   double_quant=double_quant)
        return model


class AutoTokenizer:
    @staticmethod
    def from_pretrained(pretrained_model_name_or_path: str | Path, **kwargs: Any) -> PreTrainedTokenizer:
        reject_unknown("AutoTokenizer.from_pretrained",
                       {k: v for k, v in kwargs.items() if k not in ("padding_side", "model_max_length")})
        path = resolve_model_path(str(pretrained_model_name_or_path))
        if path.is_dir():
            tokenizer = Tokenizer.from_hf_dir(path)
        else:  # a GGUF file: its tokenizer comes with the weights
            _, tokenizer = load_model(path, dtype="float32", device="cpu")
        wrapped = wrap_tokenizer(tokenizer, path)
        wrapped.padding_side = kwargs.get("padding_side", wrapped.padding_side)
        wrapped.model_max_length = kwargs.get("model_max_length", wrapped.model_max_length)
        return wrapped

"""load_model: a name, a Hugging Face directory or a GGUF file -> (model, tokenizer)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from thrifty.errors import ThriftyError
from thrifty.formats.build import QUANTIZE_CHOICES, build_model
from thrifty.formats.default_model import resolve_model_path
from thrifty.formats.hf import hf_tensors, load_hf_config
from thrifty.kernels.malloc_tuning import tune_malloc
from thrifty.model.config import DTYPE_NAMES
from thrifty.model.decoder import CausalLM
from thrifty.model.tokenizer import Tokenizer

DTYPES = {name: getattr(torch, torch_name) for name, torch_name in DTYPE_NAMES.items()}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ThriftyError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def default_device() -> torch.device:
    """CUDA if there is one (under torchrun: this process's GPU, LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_model(
    name_or_path: str | Path | None = None,
    *,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device | None = None,
    quantize: str | None = None,
    double_quant: bool = True,
) -> tuple[CausalLM, Tokenizer]:
    """Load a model and its tokenizer, ready for inference (eval mode, no grad needed).

    name_or_path: None or "smollm2-135m-instruct" for the built-in default model, a
    Hugging Face model directory, or a .gguf file.
    quantize: None (every weight in `dtype`); "auto" ("gguf" for a .gguf file, else None);
    "nf4" / "int8" (the decoder's linear layers
    quantized tensor by tensor as they are read: QLoRA's base without a full-precision
    copy first); "gguf" (a GGUF file's quantized matrices kept in the file's own blocks,
    embeddings and head included, multiplied by Thrifty's block kernels).
    double_quant: nf4's scales quantized again (bitsandbytes' bnb_4bit_use_double_quant).
    Peak memory while loading is the loaded model plus about one tensor.
    """
    tune_malloc()  # every workload starts here; see malloc_tuning.py for why
    path = resolve_model_path(None if name_or_path is None else str(name_or_path))
    torch_dtype = parse_dtype(dtype)
    if quantize == "auto":
        quantize = None if path.is_dir() else "gguf"
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ThriftyError(f"quantize {quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}, 'auto' or None.")
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise ThriftyError(f"{path} is a LoRA adapter (adapter_config.json), not a model. Load its base model and "
                           "the adapter on top: `thrifty generate --adapter DIR` / `thrifty chat --adapter DIR`, "
                           "load_adapter(load_model(base)[0], DIR) in Python, or `thrifty merge DIR` for a "
                           "standalone model.")
    if path.is_dir():
        if quantize == "gguf":
            raise ThriftyError(f"quantize: gguf keeps a GGUF file's own blocks, but {path} is a Hugging Face "
                               "directory; use nf4 or int8 for it, or load a .gguf file.")
        config = load_hf_config(path)
        tensors = hf_tensors(path)
        tokenizer = Tokenizer.from_hf_dir(path)
    else:
        from thrifty.formats.gguf import read_gguf  # the gguf package is only needed here

        config, tokenizer, gguf_tensors = read_gguf(path)
        tensors = gguf_tensors.items(torch_dtype, keep_blocks=quantize == "gguf")
    model = build_model(config, tensors, source=str(path), dtype=torch_dtype, quantize=quantize,
                        double_quant=double_quant)
    model.to(device=device or default_device(), dtype=torch_dtype)
    return model.eval(), tokenizer


def load_tokenizer(name_or_path: str | Path | None = None) -> Tokenizer:
    """A model's tokenizer alone (the default model's for None), without its weights."""
    path = resolve_model_path(None if name_or_path is None else str(name_or_path))
    if path.is_dir():
        return Tokenizer.from_hf_dir(path)
    from thrifty.formats.gguf import read_gguf

    return read_gguf(path)[1]

"""load_model: a name, a Hugging Face directory or a GGUF file -> (model, tokenizer)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from thrifty.errors import ThriftyError
from thrifty.formats.build import build_model
from thrifty.formats.default_model import resolve_model_path
from thrifty.formats.hf import load_hf_config, load_hf_state_dict
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
) -> tuple[CausalLM, Tokenizer]:
    """Load a model and its tokenizer, ready for inference (eval mode, no grad needed).

    name_or_path: None or "smollm2-135m-instruct" for the built-in default model, a
    Hugging Face model directory, or a .gguf file.
    """
    tune_malloc()  # every workload starts here; see malloc_tuning.py for why
    path = resolve_model_path(None if name_or_path is None else str(name_or_path))
    torch_dtype = parse_dtype(dtype)
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise ThriftyError(f"{path} is a LoRA adapter (adapter_config.json), not a model. Load its base model and "
                           "the adapter on top: `thrifty generate --adapter DIR` / `thrifty chat --adapter DIR`, "
                           "load_adapter(load_model(base)[0], DIR) in Python, or `thrifty merge DIR` for a "
                           "standalone model.")
    if path.is_dir():
        config = load_hf_config(path)
        state = load_hf_state_dict(path, torch_dtype)
        tokenizer = Tokenizer.from_hf_dir(path)
    else:
        from thrifty.formats.gguf import load_gguf  # the gguf package is only needed here

        config, state, tokenizer = load_gguf(path, torch_dtype)
    model = build_model(config, state, source=str(path))
    model.to(device=device or default_device(), dtype=torch_dtype)
    return model.eval(), tokenizer

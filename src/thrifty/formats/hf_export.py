"""Export a model as a Hugging Face model directory.

The directory holds config.json, model.safetensors, generation_config.json and the
tokenizer files: `transformers.AutoModelForCausalLM.from_pretrained`, `thrifty.load_model`,
llama.cpp's convert_hf_to_gguf.py and PEFT (as a base model) all read it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from thrifty.errors import ThriftyError
from thrifty.formats.atomic import atomic_directory, require_finite
from thrifty.layers.lora import LoraLinear
from thrifty.layers.quant import is_quantized
from thrifty.model.decoder import CausalLM
from thrifty.model.tokenizer import Tokenizer

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """Weights under transformers' names, contiguous on CPU. A tied lm_head is left out,
    as save_pretrained does: the file holds the shared tensor once, as the embedding."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            raise ThriftyError(f"save_hf_model: {name} still has a LoRA adapter. Merge it first "
                               "(thrifty.layers.lora.merge_lora(model)), or save the adapter with save_adapter.")
        if is_quantized(module):
            raise ThriftyError(f"save_hf_model: {name} is quantized ({type(module).__name__}); a Hugging Face "
                               "directory needs full-precision weights. Load the base model unquantized.")
    # Weights sharded by FSDP2 (DTensors) are gathered whole: under torchrun every rank calls this.
    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().to("cpu").contiguous()
             for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def hf_config_dict(model: CausalLM) -> dict[str, Any]:
    config = model.config.to_hf_dict()
    config["dtype"] = _DTYPE_NAMES.get(model.dtype, "float32")  # transformers 5's key
    config["torch_dtype"] = config["dtype"]  # what transformers 4 reads
    return config


def generation_config_dict(model: CausalLM, tokenizer: Tokenizer) -> dict[str, Any]:
    """Every token that ends a reply (eos and the chat template's end-of-turn) as
    eos_token_id, so transformers' generate stops where ours does."""
    stops = list(dict.fromkeys([*model.config.eos_token_ids, *tokenizer.stop_token_ids]))
    return {
        "bos_token_id": model.config.bos_token_id,
        "eos_token_id": stops[0] if len(stops) == 1 else stops,
        "pad_token_id": tokenizer.pad_token_id,
    }


def save_hf_model(model: CausalLM, tokenizer: Tokenizer, directory: str | Path,
                  state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model` and `tokenizer` as a Hugging Face model directory (replacing it
    atomically if it exists) and return its path. The model must be plain: merge LoRA
    adapters first; quantized layers cannot be exported. `state`: hf_state_dict(model),
    if the caller has it already."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ThriftyError(f"{directory} exists and is not a directory; choose another output path.")
    state = hf_state_dict(model) if state is None else state  # checks before creating anything
    with atomic_directory(directory) as tmp:
        write_hf_files(model, tokenizer, tmp, state)
    return directory


def write_hf_files(model: CausalLM, tokenizer: Tokenizer, directory: Path,
                   state: dict[str, torch.Tensor] | None = None) -> None:
    """The files of a Hugging Face model directory, written into an existing directory
    (no atomic rename: for callers that build a larger directory atomically themselves)."""
    state = hf_state_dict(model) if state is None else state
    weights = directory / "model.safetensors"
    require_finite(state, weights)
    save_file(state, str(weights), metadata={"format": "pt"})
    _write_json(directory / "config.json", hf_config_dict(model))
    # safetensors creates its file owner-only (0600): give it the permissions the umask
    # gives the JSON files beside it.
    os.chmod(weights, (directory / "config.json").stat().st_mode & 0o777)
    _write_json(directory / "generation_config.json", generation_config_dict(model, tokenizer))
    tokenizer.save(directory)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


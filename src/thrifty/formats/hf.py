"""Read a Hugging Face model directory: config.json and *.safetensors (one file or shards)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from thrifty.errors import ThriftyError
from thrifty.model.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ThriftyError(f"{path}: file not found.") from None
    except json.JSONDecodeError as err:
        raise ThriftyError(f"{path}: line {err.lineno}: not valid JSON ({err.msg}).") from None


def load_hf_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    if not path.exists():
        raise ThriftyError(
            f"{directory}: no config.json; a Hugging Face model directory needs config.json, "
            "*.safetensors weights and tokenizer.json."
        )
    return ModelConfig.from_hf_dict(read_json(path), source=str(path))


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a directory: one file, or the shards its index lists."""
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ThriftyError(f"{index}: missing the 'weight_map' object.")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.exists():
                raise ThriftyError(f"{index}: lists shard {file.name}, which is missing from {directory}.")
        return files
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise ThriftyError(
            f"{directory}: no *.safetensors weights found (PyTorch .bin checkpoints are not "
            "supported: convert them with transformers' save_pretrained(safe_serialization=True))."
        )
    return found


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ThriftyError(
            f"{path}: cannot read safetensors file ({err}); it may be truncated or corrupt — "
            "download or export it again."
        ) from None


def hf_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of a directory, one tensor at a time, read through the shards' mmap."""
    for file in weight_files(directory):
        try:
            with safe_open(str(file), framework="pt") as shard:
                for name in shard.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, shard.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise ThriftyError(
                f"{file}: cannot read safetensors file ({err}); it may be truncated or corrupt — "
                "download or export it again."
            ) from None


def load_hf_state_dict(directory: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All weights of a directory, converted to `dtype` shard by shard (None keeps the
    stored dtypes), so peak memory stays near one copy of the model."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(directory):
        shard = load_safetensors(file)
        state.update(shard if dtype is None else {k: v.to(dtype) for k, v in shard.items()})
    return state

"""Training checkpoints: write atomically, find the latest, restore exactly.

`output_dir/checkpoint-{step}/` holds everything a resumed run needs to continue as if
it had never stopped:

    adapter_config.json + adapter_model.safetensors   LoRA: the adapter, in PEFT's format
    or config.json + model.safetensors + tokenizer     full: a Hugging Face model directory
    optimizer.pt        AdamW moments and step counts (and fp32 master weights)
    rng_state.pt        Python, NumPy and torch generator states (rank 0's; under torchrun
                        rng_state_{rank}.pt for the other ranks)
    trainer_state.json  step, data order position, partial logging window, schedule
    config.yaml         the run's config, to check a resume uses compatible settings

The directory is written under a temporary name and renamed into place (thrifty.formats.atomic),
so a checkpoint-{step} directory is always complete: a crash or kill -9 during a save
leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from thrifty.config_io import config_to_dict
from thrifty.errors import ThriftyError
from thrifty.formats.atomic import atomic_directory
from thrifty.formats.hf_export import save_hf_model, write_hf_files
from thrifty.formats.peft_adapter import KEY_PREFIX, save_adapter
from thrifty.formats.peft_adapter import WEIGHTS_NAME as ADAPTER_WEIGHTS
from thrifty.training.distributed import shard_like
from thrifty.layers.lora import has_lora

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
FULL_WEIGHTS = "model.safetensors"


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint-N directory was saved at."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint-N directory")
    return int(match.group(1))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def rng_state_file(rank: int) -> str:
    return "rng_state.pt" if rank == 0 else f"rng_state_{rank}.pt"


def rng_state() -> dict[str, Any]:
    """Generator states as plain lists and tensors (loadable with weights_only=True)."""
    version, mt_state, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: Path, step: int, *, model: nn.Module, tokenizer: Any, optimizer_state: dict,
                    trainer_state: dict[str, Any], config_yaml: str, base_model_name_or_path: str,
                    save_total_limit: int | None, rng_states: Sequence[dict[str, Any]] | None = None,
                    model_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint-{step} atomically, then delete the oldest beyond save_total_limit.
    rng_states: every rank's generator states, rank 0 first (default: this process's);
    model_state: hf_state_dict(model) for full fine-tuning, if the caller has it."""
    final = checkpoint_dir(output_dir, step)
    with atomic_directory(final) as tmp:
        if has_lora(model):
            save_adapter(model, tmp, base_model_name_or_path)
        else:
            write_hf_files(model, tokenizer, tmp, model_state)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        for rank, state in enumerate(rng_states or [rng_state()]):
            torch.save(state, tmp / rng_state_file(rank))
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        # Written last (and checked by list_checkpoints) as a second guard of completeness.
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")
    if save_total_limit is not None:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class LoadedCheckpoint:
    path: Path
    optimizer_state: dict[str, Any]
    rng_state: dict[str, Any]
    trainer_state: dict[str, Any]
    config_yaml: str


def save_trained_model(model: nn.Module, tokenizer: Any, output_dir: Path, base_model_name_or_path: str,
                       model_state: dict[str, torch.Tensor] | None = None) -> Path:
    """A run's result: output_dir/adapter (LoRA, PEFT format) or output_dir/model (full, HF
    format; model_state: hf_state_dict(model), if the caller has it)."""
    if has_lora(model):
        path = output_dir / "adapter"
        with atomic_directory(path) as tmp:
            save_adapter(model, tmp, base_model_name_or_path)
        return path
    return save_hf_model(model, tokenizer, output_dir / "model", model_state)


# Settings that only say where and how a run reports or resumes: never worth a notice.
_NOT_SETTINGS = ("resume_from_checkpoint", "output_dir", "overwrite_output_dir", "disable_tqdm")


def setting_differences(saved_yaml: str, config: Any, keys: Sequence[str] | None = None) -> list[str]:
    """'key: saved -> now' for each of `keys` (default: every setting but those that only
    say where a run reports or resumes) that differs between a checkpoint's config.yaml and
    `config`."""
    saved = yaml.safe_load(saved_yaml) or {}
    current = config_to_dict(config)
    keys = [k for k in current if k not in _NOT_SETTINGS] if keys is None else keys
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys
            if k in saved and saved.get(k) != current.get(k)]


def settings_must_match(config: Any, keys: tuple[str, ...]) -> Callable[[str, Path], None]:
    """A check_config for load_checkpoint: refuse to resume when any of `keys` differs
    between the checkpoint's saved config.yaml and the current config."""

    def check(saved_yaml: str, path: Path) -> None:
        different = setting_differences(saved_yaml, config, keys)
        if different:
            raise ThriftyError(f"{path}: cannot resume with different settings ({'; '.join(different)}). Use the "
                               "checkpoint's values (see its config.yaml), or start a new run without "
                               "resume_from_checkpoint.")

    return check


def load_checkpoint(path: Path, model: nn.Module, check_config: Callable[[str, Path], None] | None = None,
                    rank: int = 0) -> LoadedCheckpoint:
    """Copy the checkpoint's trainable weights into `model` and return the rest, with
    rank `rank`'s RNG state (rank 0's if the checkpoint was saved by fewer ranks).
    check_config(config_yaml, path) runs first, to refuse an incompatible run before
    anything is touched."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise ThriftyError(f"{path}: not a complete Thrifty checkpoint (no {STATE_FILE}). Pass a "
                           "checkpoint-<step> directory from output_dir, or resume_from_checkpoint: latest.")
    try:
        config_yaml = (path / "config.yaml").read_text(encoding="utf-8")
        if check_config is not None:
            check_config(config_yaml, path)
        _load_weights(path, model)
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng_file = path / rng_state_file(rank)
        rng = torch.load(rng_file if rng_file.is_file() else path / rng_state_file(0), map_location="cpu",
                         weights_only=True)
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, RuntimeError, json.JSONDecodeError) as e:
        raise ThriftyError(f"{path}: the checkpoint is damaged ({e}); resume from an older checkpoint-<step>.") from e
    return LoadedCheckpoint(path, optimizer_state, rng, state, config_yaml)


def resume_from(setting: Any, output_dir: Path, model: nn.Module, optimizer: Any,
                check_config: Callable[[str, Path], None], rank: int = 0) -> LoadedCheckpoint | None:
    """Apply a `resume_from_checkpoint` setting: None/false/"" start fresh (returns None);
    "latest"/true take the newest checkpoint in output_dir; anything else is a checkpoint
    directory. Restores the weights, the optimizer and the RNG state; the trainer restores
    its own state (step, data order, ...) from the returned trainer_state."""
    if setting in (None, False, "", "false", "none"):
        return None
    if setting is True or (isinstance(setting, str) and setting.lower() in ("latest", "true")):
        path = find_latest_checkpoint(output_dir)
        if path is None:
            raise ThriftyError(f"resume_from_checkpoint: there is no checkpoint-<step> directory in {output_dir} "
                               "to resume from. Remove resume_from_checkpoint to start afresh, or point it at a "
                               "checkpoint directory.")
    else:
        path = Path(str(setting))
        if not path.is_dir():
            raise ThriftyError(f"resume_from_checkpoint: {path} is not a directory. Give a checkpoint-<step> "
                               "directory, or 'latest'.")
    checkpoint = load_checkpoint(path, model, check_config=check_config, rank=rank)
    try:
        optimizer.load_state_dict(checkpoint.optimizer_state)
    except (ValueError, KeyError) as e:
        raise ThriftyError(f"{path}: the optimizer state does not fit this model ({e}); resume with the "
                           "same model and method as the checkpoint.") from e
    set_rng_state(checkpoint.rng_state)
    return checkpoint


def _load_weights(path: Path, model: nn.Module) -> None:
    lora = has_lora(model)
    file = path / (ADAPTER_WEIGHTS if lora else FULL_WEIGHTS)
    if not file.is_file():
        kind = "a LoRA adapter" if lora else "full model weights"
        raise ThriftyError(f"{path}: expected {kind} in {file.name}, which is missing. Was the checkpoint "
                           f"written with use_lora: {str(not lora).lower()}? Use the same method to resume.")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ThriftyError(f"{file}: cannot read the checkpoint weights ({e}).") from e
    if lora:
        tensors = {k[len(KEY_PREFIX):] if k.startswith(KEY_PREFIX) else k: v for k, v in tensors.items()}
    params = dict(model.named_parameters())  # tied weights appear once, under the first name
    trainable = {name for name, p in params.items() if p.requires_grad}
    unknown = sorted(set(tensors) - set(params) - {"lm_head.weight"})
    missing = sorted(trainable - set(tensors))
    mismatched = sorted(n for n, t in tensors.items() if n in params and t.shape != params[n].shape)
    if unknown or missing or mismatched:
        raise ThriftyError(f"{file}: does not fit this model (unknown weights {unknown[:3]}, missing {missing[:3]}, "
                           f"other shapes {mismatched[:3]}); "
                           "resume with the same model and LoRA settings as the checkpoint.")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name in params:
                params[name].copy_(shard_like(tensor, params[name]))  # FSDP2: this rank's piece

"""LoRA adapters on disk in PEFT's format, both ways.

A directory holds `adapter_config.json` (PEFT's LoraConfig as JSON) and
`adapter_model.safetensors` with PEFT's keys,
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. What we save loads
with `peft.PeftModel.from_pretrained`, and adapters trained with PEFT load here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from thrifty.errors import ThriftyError
from thrifty.formats.atomic import atomic_file, non_finite, require_finite
from thrifty.layers.lora import (
    LoraConfig, LoraLinear, apply_lora, linear_module_names, lora_layers, lora_state_dict,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # PEFT before safetensors became the default
KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model

# Per-layer tensor names in the file, and where they go in a LoraLinear.
_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",  # how some PEFT versions wrote DoRA
}

# PEFT options that change what an adapter computes and that Thrifty does not implement:
# field -> (value(s) that are fine, what to tell the user).
_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "fan_in_fan_out": (lambda v: not v, "only for GPT-2 style Conv1D layers, which Llama-family models do not have"),
    "bias": (lambda v: v in (None, "none"), "trained base-layer biases are not supported yet"),
    "modules_to_save": (lambda v: not v, "fully trained extra modules (e.g. lm_head) are not supported yet"),
    "layer_replication": (lambda v: not v, "layer replication is not supported"),
    "lora_bias": (lambda v: not v, "a bias on lora_B is not supported yet"),
    "use_qalora": (lambda v: not v, "QA-LoRA is not supported"),
    "target_parameters": (lambda v: not v, "LoRA on raw parameters (MoE experts) is not supported"),
    "trainable_token_indices": (lambda v: not v, "trainable token embeddings are not supported yet"),
    "alora_invocation_tokens": (lambda v: v is None, "activated LoRA (aLoRA) is not supported"),
    "use_bdlora": (lambda v: not v, "BD-LoRA is not supported"),
    "arrow_config": (lambda v: v is None, "Arrow routing is not supported"),
}


def _target_modules_for_file(model: nn.Module, config: LoraConfig) -> list[str] | str:
    if config.target_modules != "all-linear":
        return sorted(config.target_modules) if isinstance(config.target_modules, list) else config.target_modules
    # PEFT expands "all-linear" when it builds the model; write the concrete layer-name
    # suffixes so any PEFT version (and any base model class) selects the same layers.
    return sorted({name.rsplit(".", 1)[-1] for name, _ in lora_layers(model)})


def peft_config_dict(model: nn.Module, config: LoraConfig, base_model_name_or_path: str) -> dict[str, Any]:
    """PEFT's adapter_config.json for `config`: the fields every PEFT version since
    0.10 understands (newer ones fill in defaults for the rest)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": _target_modules_for_file(model, config),
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "bias": config.bias,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "auto_mapping": None,
    }


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str) -> Path:
    """Write the model's LoRA adapter as a PEFT adapter directory; returns the directory.

    base_model_name_or_path: what the adapter was trained on (a hub id or a local path),
    recorded in adapter_config.json as PEFT does.
    """
    config = getattr(model, "lora_config", None)
    if not isinstance(config, LoraConfig):
        raise ThriftyError("save_adapter: the model has no LoRA adapter (call apply_lora or load_adapter first).")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ThriftyError(f"save_adapter: {directory} exists and is not a directory.")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {KEY_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    require_finite(tensors, directory / WEIGHTS_NAME)
    atomic_file(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(peft_config_dict(model, config, base_model_name_or_path), indent=2, sort_keys=True) + "\n"
    atomic_file(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return directory


def read_adapter_config(directory: Path) -> tuple[LoraConfig, dict[str, Any]]:
    """adapter_config.json -> (our LoraConfig, the raw dict), refusing what we cannot run."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ThriftyError(f"{path} not found: a PEFT adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME}.")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ThriftyError(f"{path} is not valid JSON ({e}).") from e
    if not isinstance(raw, dict):
        raise ThriftyError(f"{path}: expected a JSON object, got {type(raw).__name__}.")
    if raw.get("peft_type", "LORA") != "LORA":
        raise ThriftyError(f"{path}: peft_type is {raw.get('peft_type')!r}; only LoRA adapters (peft_type "
                           f"'LORA') are supported.")
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise ThriftyError(f"{path}: task_type is {raw['task_type']!r}; only CAUSAL_LM adapters fit a "
                           f"causal language model.")
    for name, (ok, why) in _UNSUPPORTED.items():
        if name in raw and not ok(raw[name]):
            raise ThriftyError(f"{path}: field {name!r} = {raw[name]!r} is not supported ({why}).")
    for name in ("r", "lora_alpha", "target_modules"):
        if name not in raw:
            raise ThriftyError(f"{path}: required field {name!r} is missing.")
    target = raw["target_modules"]
    try:
        config = LoraConfig(
            r=raw["r"], lora_alpha=raw["lora_alpha"], lora_dropout=raw.get("lora_dropout") or 0.0,
            target_modules=sorted(target) if isinstance(target, list) else target,
            use_rslora=bool(raw.get("use_rslora", False)), use_dora=bool(raw.get("use_dora", False)),
            bias=raw.get("bias") or "none",
            rank_pattern=dict(raw.get("rank_pattern") or {}), alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        )
    except ThriftyError as e:
        raise ThriftyError(f"{path}: {e}") from e
    return config, raw


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    path = directory / WEIGHTS_NAME
    if path.is_file():
        try:
            return load_file(path), path
        except (SafetensorError, OSError) as e:
            raise ThriftyError(f"{path} is not a readable safetensors file ({e}).") from e
    legacy = directory / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True), legacy
        except Exception as e:  # torch.load raises many types for a corrupt file
            raise ThriftyError(f"{legacy} could not be read ({e}).") from e
    raise ThriftyError(f"{path} not found: a PEFT adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                       f"(or the older {LEGACY_WEIGHTS_NAME}).")


def _group_by_module(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """File keys -> {module name: {"lora_A"|"lora_B"|"magnitude": tensor}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise ThriftyError(f"{path}: key {key!r} does not start with {KEY_PREFIX!r}; this is not a PEFT "
                               f"adapter for a causal language model.")
        name = key[len(KEY_PREFIX):]
        for suffix, kind in _SUFFIXES.items():
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[kind] = tensor
                break
        else:
            raise ThriftyError(f"{path}: key {key!r} is not a LoRA weight this loader understands (expected "
                               f"names ending in .lora_A.weight, .lora_B.weight or .lora_magnitude_vector); "
                               f"embedding LoRA, modules_to_save and trained biases are not supported yet.")
    return modules


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the LoRA adapter saved in `directory` (by Thrifty or by PEFT) to `model`,
    in place, and return it. The base model may be quantized (QLoRA inference)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ThriftyError(f"load_adapter: adapter directory {directory} does not exist.")
    config, raw = read_adapter_config(directory)
    tensors, path = _read_weights(directory)
    bad = non_finite(tensors)
    if bad:
        raise ThriftyError(f"{path}: {len(bad)} of {len(tensors)} tensors hold NaN or infinite values (e.g. "
                           f"{bad[0]}); the training that saved them diverged. Use an earlier checkpoint's adapter.")
    modules = _group_by_module(tensors, path)
    if not modules:
        raise ThriftyError(f"{path} holds no LoRA weights.")
    base_name = raw.get("base_model_name_or_path") or "an unknown base model"
    available = set(linear_module_names(model))
    for name, parts in sorted(modules.items()):
        if name not in available:
            raise ThriftyError(
                f"{path}: the adapter has weights for {name!r}, which this model does not have as a linear "
                f"layer (the adapter was trained on {base_name}; is this the same architecture?).")
        missing = {"lora_A", "lora_B"} - parts.keys()
        if missing:
            raise ThriftyError(f"{path}: {name!r} has no {' / '.join(sorted(missing))} weight.")
        if config.use_dora != ("magnitude" in parts):
            raise ThriftyError(f"{path}: use_dora is {config.use_dora} in {CONFIG_NAME} but {name!r} "
                               f"{'lacks' if config.use_dora else 'has'} a lora_magnitude_vector.")
    order = [name for name in linear_module_names(model) if name in modules]  # model order
    if any(True for _ in lora_layers(model)):
        raise ThriftyError("load_adapter: the model already has LoRA layers; load the adapter onto a fresh "
                           "base model (or merge_lora the existing one first).")
    # Check every shape before touching the model, so a bad file leaves it unchanged.
    for name in order:
        base = model.get_submodule(name)
        r, _ = config.rank_and_alpha(name)
        expected = {"lora_A": (r, base.in_features), "lora_B": (base.out_features, r),
                    "magnitude": (base.out_features,)}
        for kind, tensor in modules[name].items():
            if tuple(tensor.shape) != expected[kind]:
                raise ThriftyError(
                    f"{path}: {name}.{kind} has shape {tuple(tensor.shape)}, but this model needs "
                    f"{expected[kind]} (r={r} from {CONFIG_NAME}, layer {base.in_features}->"
                    f"{base.out_features}). Was the adapter trained on {base_name}?")
    apply_lora(model, config, targets=order)
    with torch.no_grad():
        for name in order:
            layer = model.get_submodule(name)
            assert isinstance(layer, LoraLinear)
            layer.lora_A.weight.copy_(modules[name]["lora_A"])
            layer.lora_B.weight.copy_(modules[name]["lora_B"])
            if layer.lora_magnitude_vector is not None:
                layer.lora_magnitude_vector.copy_(modules[name]["magnitude"])
    return model


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()

"""TRL's own SFTConfig / GRPOConfig objects, read into Thrifty's config of the same name.

Code written for TRL builds `trl.SFTConfig(...)` and hands it to the trainer. Thrifty's
configs use TRL's field names and meanings, so such an object is read field by field:
every field the user set (its value differs from what TRL's class holds by default) is
passed to Thrifty's config by name, enums as their values. A set field Thrifty lacks
stops with Thrifty's usual "not a setting Thrifty has" error naming it. Fields left at
TRL's defaults keep Thrifty's defaults, and where the two differ (TRL's SFT learning
rate is 2e-5, Thrifty's LoRA-minded 2e-4) one notice lists them, so nothing changes
silently.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from thrifty.compat.arguments import notice

# Fields TrainingArguments derives from others or from the machine: never "set by the user".
DERIVED = frozenset({"logging_dir", "run_name", "use_cpu", "local_rank", "accelerator_config",
                     "dataloader_pin_memory", "distributed_state"})
# Derived from the batch fields by both, alike (TRL holds the numbers, Thrifty None).
DERIVED_ALIKE = frozenset({"generation_batch_size", "steps_per_generation"})
# Values that say "nothing" or "off" in one library or the other.
EMPTY = (None, "", "none", [], 0.0)
# What TRL's defaults are computed from: the reference object takes the user's values.
BATCH_FIELDS = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_generations")


def is_trl_config(config: Any, kind: type) -> bool:
    return type(config).__module__.split(".")[0] == "trl" and type(config).__name__ == kind.__name__


def from_trl_config(config: Any, kind: type) -> Any:
    """Thrifty's `kind` holding the fields set on TRL's `config` (see the module doc)."""
    given = {name: getattr(config, name) for name in BATCH_FIELDS if hasattr(config, name)}
    reference = type(config)(use_cpu=True, **given)
    ours = {f.name for f in dataclasses.fields(kind)}
    set_by_user: dict[str, Any] = {}
    left: list[str] = []
    for field in dataclasses.fields(config):
        if field.name in DERIVED or not field.init:
            continue
        value, default = _plain(getattr(config, field.name)), _plain(getattr(reference, field.name))
        if value != default or field.name in given and field.name in ours:
            set_by_user[field.name] = value
        elif field.name in ours:
            left.append(field.name)
    if {"bf16", "fp16"} & set(set_by_user):  # the pair decides (both false: float32), so read both
        set_by_user.update(bf16=config.bf16, fp16=config.fp16)
    result = kind(**set_by_user)
    differing = [f"{name} ({getattr(result, name)!r}; TRL: {_plain(getattr(reference, name))!r})"
                 for name in left if name not in DERIVED_ALIKE
                 and not _same(getattr(result, name), _plain(getattr(reference, name)))]
    if differing:
        notice(f"read trl.{type(config).__name__}'s fields {', '.join(sorted(set_by_user)) or '(none set)'}; "
               f"the fields left at TRL's defaults take Thrifty's, which differ for: {', '.join(differing)}.")
    return result


def _same(ours: Any, theirs: Any) -> bool:
    return bool(ours == theirs) or (ours in EMPTY and theirs in EMPTY)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value

"""open_model: the one way to open a model, with or without a LoRA adapter on top.

The generate / chat / eval commands, `thrifty merge` and `export-gguf`, training that
continues an adapter, and the Unsloth-style saving all open models here, so one rule
decides which base an adapter goes on:

* the base you name (`--model`, `model_name_or_path`) if you name one; it may differ from
  the base the adapter records (a GGUF of the same model, a local copy), which is said in
  a notice, and the adapter's shapes are checked against it layer by layer;
* else the base the adapter records in adapter_config.json (`base_model_name_or_path`);
* else nothing is guessed: an error says to name the base.

merge=True folds the adapter into the base in float32 (onto the unquantized weights,
even for a QLoRA adapter) and rounds once to `dtype`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from thrifty.errors import ThriftyError
from thrifty.formats.default_model import DEFAULT_MODEL_NAME, resolve_model_path
from thrifty.formats.loader import load_model, parse_dtype
from thrifty.formats.peft_adapter import CONFIG_NAME, load_adapter, read_adapter_config
from thrifty.layers.lora import merge_lora
from thrifty.model.decoder import CausalLM
from thrifty.model.tokenizer import Tokenizer
from thrifty.model.weights_epoch import advance_weights_epoch


def _print(text: str) -> None:
    print(text, flush=True)


def recorded_base(adapter: str | Path) -> str | None:
    """The base model an adapter directory records (None if it names none)."""
    directory = Path(adapter)
    if not (directory / CONFIG_NAME).is_file():
        raise ThriftyError(f"adapter {adapter}: no {CONFIG_NAME} there; give a LoRA adapter directory (PEFT format, "
                           "e.g. out/sft/adapter).")
    return read_adapter_config(directory)[1].get("base_model_name_or_path") or None


def base_for(adapter: str | Path, base: str | None) -> str:
    """The rule: the base named, else the one the adapter records, else an error."""
    if base:
        return str(base)
    recorded = recorded_base(adapter)
    if recorded is None:
        raise ThriftyError(f"{Path(adapter) / CONFIG_NAME} names no base model (base_model_name_or_path); name "
                           "it: --model on the command line, model_name_or_path in a config.")
    return recorded


def same_model(a: str, b: str) -> bool:
    """Whether two names open the same files (a hub id and its cached directory, say)."""
    try:
        return a == b or resolve_model_path(a).resolve() == resolve_model_path(b).resolve()
    except ThriftyError:
        return False


def attach_adapter(model: nn.Module, adapter: str | Path, base: str,
                   log: Callable[[str], None] = _print) -> nn.Module:
    """Load `adapter` onto `model` (opened as `base`), in place, under the rule above."""
    recorded = recorded_base(adapter)
    if recorded is not None and not same_model(recorded, base):
        log(f"note: the adapter {adapter} was trained on {recorded}; applying it to {base} as asked (its layer "
            "shapes are checked).")
    load_adapter(model, adapter)
    advance_weights_epoch(model)
    return model


def open_model(base: str | Path | None = None, adapter: str | Path | None = None, *, merge: bool = False,
               quantize: str | None = None, dtype: str | torch.dtype | None = "bfloat16",
               device: str | torch.device | None = None,
               log: Callable[[str], None] = _print) -> tuple[CausalLM, Tokenizer, str]:
    """(model, tokenizer, the base's name): `base` (None: the adapter's recorded base, or
    the default model without an adapter) with `adapter` on top, live (the generation
    engine runs it unmerged) or merged (merge=True; dtype None keeps float32).
    quantize: the base's storage, as load_model takes it ("nf4", "int8": quantized as read;
    "gguf": a GGUF file's own blocks)."""
    name = base_for(adapter, None if base is None else str(base)) if adapter is not None else (
        str(base) if base is not None else DEFAULT_MODEL_NAME)
    if merge:
        if adapter is None:
            raise ThriftyError("open_model: merge=True needs an adapter to merge.")
        model, tokenizer = load_model(name, dtype="float32", device="cpu")
        attach_adapter(model, adapter, name, log)
        target = None if dtype is None else parse_dtype(dtype)
        merge_lora(model, dtype=target)
        if target is not None:
            model.to(target)
        advance_weights_epoch(model)
        return model, tokenizer, name
    model, tokenizer = load_model(name, dtype=dtype or "float32", device=device, quantize=quantize)
    if adapter is not None:
        attach_adapter(model, adapter, name, log)
    return model, tokenizer, name

"""SFTTrainer and GRPOTrainer that take TRL's constructor as well as Thrifty's own.

    SFTTrainer(model, tokenizer, config, train_dataset)                       # Thrifty's
    SFTTrainer(model=model or "name", args=SFTConfig(...), train_dataset=ds,
               processing_class=tokenizer, peft_config=LoraConfig(...))        # TRL's
    GRPOTrainer(model="name", reward_funcs=f or [f, ...], args=GRPOConfig(...), train_dataset=ds)

As in TRL: a model given by name is loaded by the trainer (args.dtype, the tokenizer
beside it); with TRL's `args=` a model without adapters and no peft_config is trained
in full (said in the log), where Thrifty's `config=` adds LoRA adapters as the config says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from thrifty.compat.arguments import reject_unknown
from thrifty.compat.lora import LoraConfig
from thrifty.compat.model import PreTrainedModel, thrifty_model
from thrifty.compat.tokenizer import thrifty_tokenizer
from thrifty.compat.trl_config import from_trl_config, is_trl_config
from thrifty.errors import ThriftyError
from thrifty.formats.loader import load_model
from thrifty.grpo.config import GRPOConfig
from thrifty.grpo.trainer import GRPOTrainer as ThriftyGRPOTrainer
from thrifty.sft.config import SFTConfig
from thrifty.sft.trainer import SFTTrainer as ThriftySFTTrainer
from thrifty.training.config import TrainingConfig
from thrifty.layers.lora import has_lora

_UNSUPPORTED_HINT = "model, args (or config), train_dataset, eval_dataset, processing_class (or tokenizer), peft_config"


def _resolve(model: Any, tokenizer: Any, config: TrainingConfig, peft_config: LoraConfig | None, trl_style: bool,
             log: Callable[[str], None]) -> tuple[Any, Any, TrainingConfig]:
    """(CausalLM, Thrifty Tokenizer, the config the run uses) from TRL's or Thrifty's arguments."""
    changes: dict[str, Any] = {}
    if isinstance(model, (str, Path)):
        changes["model_name_or_path"] = str(model)
        model, loaded_tokenizer = load_model(model, dtype=config.dtype)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)  # the facade keeps the one it was loaded with
        if tokenizer is None:
            raise ThriftyError("the trainer needs the tokenizer: pass processing_class=tokenizer (or tokenizer=).")
    if isinstance(model, PreTrainedModel):
        changes.setdefault("model_name_or_path", model.name_or_path)
        if model.gradient_checkpointing:
            changes["gradient_checkpointing"] = True
    causal_lm = thrifty_model(model)
    if peft_config is not None:
        if not isinstance(peft_config, LoraConfig):
            raise ThriftyError(f"peft_config must be thrifty.LoraConfig, got {type(peft_config).__name__}.")
        if has_lora(causal_lm):
            raise ThriftyError("peft_config was given but the model already has LoRA adapters; pass one or the other.")
        lora = peft_config.thrifty()
        changes.update(use_lora=True, lora_r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                       lora_target_modules=lora.target_modules, use_rslora=lora.use_rslora, use_dora=lora.use_dora)
    elif trl_style and not has_lora(causal_lm) and config.use_lora:
        log("no peft_config and no adapters on the model: full fine-tuning of every weight, as TRL does (pass "
            "peft_config=LoraConfig(...) for LoRA).")
        changes["use_lora"] = False
    return causal_lm, thrifty_tokenizer(tokenizer), dataclasses.replace(config, **changes) if changes else config


def _config(config: Any, args: Any, kind: type) -> Any:
    if config is not None and args is not None:
        raise ThriftyError("both config= and args= were given; pass one (args= is TRL's name for it).")
    chosen = args if args is not None else config
    if chosen is not None and is_trl_config(chosen, kind):
        return from_trl_config(chosen, kind)
    if chosen is not None and not isinstance(chosen, kind):
        raise ThriftyError(f"args must be thrifty.{kind.__name__} or trl.{kind.__name__}, got "
                           f"{type(chosen).__module__}.{type(chosen).__name__}.")
    return chosen if chosen is not None else kind()


def _with_fields(config: Any, kwargs: dict[str, Any], where: str, also: str) -> Any:
    """Config fields passed to the trainer itself (older TRL and Unsloth's notebooks pass
    max_seq_length, dataset_text_field, packing, dataset_num_proc there)."""
    fields = {f.name for f in dataclasses.fields(config)}
    reject_unknown(where, {k: v for k, v in kwargs.items() if k not in fields}, f"{_UNSUPPORTED_HINT}, {also}, "
                   f"and any field of {type(config).__name__}")
    values = {k: v for k, v in kwargs.items() if k in fields}
    if "max_seq_length" in values:  # the trainer's max_seq_length wins over the config's max_length
        values["max_length"] = values["max_seq_length"]
    return dataclasses.replace(config, **values) if values else config


class SFTTrainer(ThriftySFTTrainer):
    def __init__(self, model: Any, tokenizer: Any = None, config: SFTConfig | None = None,
                 train_dataset: Any = None, eval_dataset: Any = None, log: Callable[[str], None] | None = None, *,
                 args: SFTConfig | None = None, processing_class: Any = None, peft_config: LoraConfig | None = None,
                 formatting_func: Callable[[dict[str, Any]], str] | None = None, **kwargs: Any) -> None:
        cfg = _with_fields(_config(config, args, SFTConfig), kwargs, "SFTTrainer", "formatting_func")
        log = log or print
        causal_lm, tok, cfg = _resolve(model, processing_class or tokenizer, cfg, peft_config, args is not None, log)
        if formatting_func is not None:
            train_dataset = _formatted(train_dataset, formatting_func, "train_dataset")
            eval_dataset = _formatted(eval_dataset, formatting_func, "eval_dataset")
        super().__init__(causal_lm, tok, cfg, train_dataset, eval_dataset, log)

    def train(self, resume_from_checkpoint: str | bool | None = None):  # type: ignore[no-untyped-def]
        if resume_from_checkpoint is not None:
            self.config.resume_from_checkpoint = resume_from_checkpoint
        return super().train()


class GRPOTrainer(ThriftyGRPOTrainer):
    def __init__(self, model: Any, tokenizer: Any = None, reward_funcs: Any = None, train_dataset: Any = None,
                 config: GRPOConfig | None = None, eval_dataset: Any = None, log: Callable[[str], None] | None = None,
                 *, args: GRPOConfig | None = None, processing_class: Any = None,
                 peft_config: LoraConfig | None = None, **kwargs: Any) -> None:
        cfg = _with_fields(_config(config, args, GRPOConfig), kwargs, "GRPOTrainer", "reward_funcs")
        log = log or print
        causal_lm, tok, cfg = _resolve(model, processing_class or tokenizer, cfg, peft_config, args is not None, log)
        if callable(reward_funcs):
            reward_funcs = [reward_funcs]  # TRL takes one function or a list
        if reward_funcs is not None:
            for f in reward_funcs:
                if not callable(f):
                    raise ThriftyError(f"reward_funcs: {f!r} is not a function. TRL also takes reward-model names; "
                                       "Thrifty takes functions f(prompts, completions, **columns) -> list[float].")
        super().__init__(causal_lm, tok, reward_funcs, train_dataset, cfg, eval_dataset, log)

    def train(self, resume_from_checkpoint: str | bool | None = None):  # type: ignore[no-untyped-def]
        if resume_from_checkpoint is not None:
            self.config.resume_from_checkpoint = resume_from_checkpoint
        return super().train()


def _formatted(dataset: Any, formatting_func: Callable[[dict[str, Any]], Any], name: str) -> Any:
    """TRL's formatting_func: each row becomes {"text": formatting_func(row)}."""
    if dataset is None:
        return None
    if isinstance(dataset, (str, Path)):
        from thrifty.training.rows import load_rows

        dataset = load_rows(dataset)
    rows: Sequence[dict[str, Any]] = list(dataset)
    out = []
    for i, row in enumerate(rows):
        text = formatting_func(row)
        if not isinstance(text, str):
            raise ThriftyError(f"{name} row {i + 1}: formatting_func returned {type(text).__name__}; it must return "
                               "one string per row (TRL's current contract; the old batched form returned lists).")
        out.append({"text": text})
    return out

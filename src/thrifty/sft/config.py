"""SFTConfig: every knob of a supervised fine-tuning run, with TRL's field names.

Someone coming from TRL's SFTConfig (and PEFT/TRL's ModelConfig for the LoRA fields)
should recognise every name; the few additions (use_lora, quantize, eval_split,
sample_prompts, ...) follow the same style. Load one from YAML with
`load_sft_config(path, ["key=value", ...])`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal, Sequence

from thrifty.config_io import load_config, require, resolve_next_to
from thrifty.training.data import FORMATS
from thrifty.errors import ThriftyError
from thrifty.formats.loader import DTYPES
from thrifty.training.setup import check_method_fields


@dataclass
class SFTConfig:
    # -- model ------------------------------------------------------------------------
    model_name_or_path: str | None = None  # None: the built-in SmolLM2-135M-Instruct
    dtype: str = "bfloat16"  # of the base weights and activations: bfloat16 or float32

    # -- data -------------------------------------------------------------------------
    train_file: str | None = None  # .jsonl/.json/.csv/.tsv/.parquet (or pass rows to SFTTrainer)
    eval_file: str | None = None
    eval_split: float = 0.0  # without eval_file: this fraction of train_file is held out for eval
    format: Literal["text", "prompt_completion", "messages", "alpaca"] | None = None  # None: detect
    max_length: int = 1024  # tokens per example (and per packed sequence)
    truncation: Literal["error", "truncate", "drop"] = "error"  # for examples longer than max_length
    packing: bool = False  # several examples per sequence, no padding
    completion_only_loss: bool = True  # loss on the completion / assistant turns only

    # -- optimisation -----------------------------------------------------------------
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4  # a LoRA rate; full fine-tuning wants ~1e-5
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0  # wins over warmup_ratio when > 0
    warmup_ratio: float = 0.0
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0: train exactly this many optimizer steps (overrides epochs)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward
    # Keep the MLP's gate/up outputs too, so the recomputation skips the MLP's matmuls
    # (a GRPO update: 11% faster; not measured on SFT) for 2 x intermediate_size more
    # values per token and layer (~5x the layer input kept otherwise). Off here: SFT
    # turns checkpointing on to fit long sequences.
    gradient_checkpointing_keep_mlp: bool = False
    # The same for the q/k/v outputs and the attention output (see grpo_config.py).
    gradient_checkpointing_keep_attention: bool = False
    seed: int = 42

    # -- method: LoRA / QLoRA / full ----------------------------------------------------
    use_lora: bool = True  # False: full fine-tuning of every weight
    lora_r: int = 16
    lora_alpha: float = 32
    # 0 by default (PEFT/TRL use 0.05): on CPU drawing the dropout masks took ~25% of a
    # LoRA step, and for short runs on small data dropout rarely pays for itself.
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    quantize: Literal["nf4", "int8"] | None = None  # quantized frozen base (nf4 + LoRA = QLoRA)

    # -- logging, evaluation, checkpoints ---------------------------------------------------
    output_dir: str = "output/sft"
    logging_steps: int = 10
    eval_steps: int | None = None  # None: evaluate at the end only
    eval_on_start: bool = False  # also evaluate before the first step (to see the improvement)
    save_steps: int = 500  # 0: no intermediate checkpoints
    save_total_limit: int | None = 2  # keep only the newest N checkpoints; None keeps all
    resume_from_checkpoint: str | bool | None = None  # a checkpoint dir, or "latest" / true
    disable_tqdm: bool = False
    # Generations printed before and after training, to see what changed. Empty: the
    # prompts of the first num_sample_prompts held-out (eval) examples.
    sample_prompts: list[str] = field(default_factory=list)
    num_sample_prompts: int = 3
    sample_max_new_tokens: int = 64

    def __post_init__(self) -> None:
        need = partial(require, self)
        need(self.dtype in DTYPES, "dtype", f"use one of {', '.join(DTYPES)}")
        need(self.format is None or self.format in FORMATS, "format", f"use one of {', '.join(FORMATS)}")
        need(0.0 <= self.eval_split < 1.0, "eval_split", "must be a fraction in [0, 1)")
        for name in ("max_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "logging_steps"):
            need(getattr(self, name) >= 1, name, "must be at least 1")
        need(self.learning_rate > 0, "learning_rate", "must be positive")
        need(self.warmup_steps >= 0, "warmup_steps", "must be 0 or more")
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be a fraction in [0, 1)")
        need(self.num_train_epochs > 0 or self.max_steps > 0, "num_train_epochs",
             "must be positive (or set max_steps)")
        need(self.weight_decay >= 0, "weight_decay", "must be 0 or more")
        need(0.0 <= self.adam_beta1 < 1.0, "adam_beta1", "must be in [0, 1)")
        need(0.0 <= self.adam_beta2 < 1.0, "adam_beta2", "must be in [0, 1)")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be 0 (no clipping) or more")
        need(self.eval_steps is None or self.eval_steps >= 1, "eval_steps", "must be at least 1, or null")
        need(self.save_steps >= 0, "save_steps", "must be 0 (no checkpoints) or more")
        need(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit",
             "must be at least 1, or null to keep every checkpoint")
        need(self.num_sample_prompts >= 0, "num_sample_prompts", "must be 0 or more")
        need(self.sample_max_new_tokens >= 1, "sample_max_new_tokens", "must be at least 1")
        check_method_fields(self)
        if self.eval_file is not None and self.eval_split > 0:
            raise ThriftyError(f"eval_file and eval_split = {self.eval_split} are both set; use one: an eval "
                               "file, or a fraction of train_file held out.")


def load_sft_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> SFTConfig:
    """SFTConfig from a YAML file and `key=value` overrides.

    A relative data or model path that does not exist from the working directory is
    looked up next to the YAML file, so `thrifty sft examples/sft_default.yaml` works
    from anywhere while paths relative to where you run keep working too.
    """
    config = load_config(SFTConfig, path, overrides)
    resolve_next_to(config, path, ("train_file", "eval_file", "model_name_or_path"))
    return config

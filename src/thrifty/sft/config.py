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

from thrifty.config_io import load_config, refuse_unknown_fields, require, resolve_next_to
from thrifty.errors import ThriftyError
from thrifty.training.config import RESUME_MUST_MATCH as SHARED_RESUME_MUST_MATCH
from thrifty.training.config import TrainingConfig

# The data formats SFT reads (see sft/examples.py); None in the config: detect per file.
FORMATS = ("text", "prompt_completion", "messages", "alpaca")
FSDP_OPTIONS = ("", "full_shard", "full_shard auto_wrap")


@refuse_unknown_fields
@dataclass
class SFTConfig(TrainingConfig):
    # -- data -------------------------------------------------------------------------
    train_file: str | None = None  # .jsonl/.json/.csv/.tsv/.parquet (or pass rows to SFTTrainer)
    eval_file: str | None = None
    eval_split: float = 0.0  # without eval_file: this fraction of train_file is held out for eval
    format: Literal["text", "prompt_completion", "messages", "alpaca"] | None = None  # None: detect
    max_length: int = 1024  # tokens per example (and per packed sequence)
    max_seq_length: int | None = None  # older TRL's and Unsloth's name for max_length
    dataset_text_field: str = "text"  # the column of the text format
    truncation: Literal["error", "truncate", "drop"] = "error"  # for examples longer than max_length
    packing: bool = False  # several examples per sequence, no padding
    completion_only_loss: bool = True  # loss on the completion / assistant turns only

    # -- optimisation (the rest: TrainingConfig) ---------------------------------------------
    per_device_eval_batch_size: int = 8
    # transformers' `fsdp`: "full_shard" (or "full_shard auto_wrap") shards the weights,
    # gradients and optimizer state over the torchrun processes with PyTorch's FSDP2, one
    # unit per decoder layer. Full fine-tuning only (LoRA's adapters are too small to gain).
    fsdp: str = ""

    # -- logging ------------------------------------------------------------------------
    output_dir: str = "output/sft"
    # Generations printed before and after training, to see what changed. Empty: the
    # prompts of the first num_sample_prompts held-out (eval) examples.
    sample_prompts: list[str] = field(default_factory=list)
    num_sample_prompts: int = 3
    sample_max_new_tokens: int = 64

    def __post_init__(self) -> None:
        self.check_shared_fields()
        need = partial(require, self)
        if self.max_seq_length is not None:
            need(self.max_seq_length >= 1, "max_seq_length", "must be at least 1")
            self.max_length = self.max_seq_length
        need(self.format is None or self.format in FORMATS, "format", f"use one of {', '.join(FORMATS)}")
        need(0.0 <= self.eval_split < 1.0, "eval_split", "must be a fraction in [0, 1)")
        for name in ("max_length", "per_device_eval_batch_size"):
            need(getattr(self, name) >= 1, name, "must be at least 1")
        need(self.num_train_epochs > 0 or self.max_steps > 0, "num_train_epochs",
             "must be positive (or set max_steps)")
        need(self.num_sample_prompts >= 0, "num_sample_prompts", "must be 0 or more")
        need(self.fsdp in FSDP_OPTIONS, "fsdp", f"use one of {', '.join(repr(o) for o in FSDP_OPTIONS)} "
             "(Thrifty shards every decoder layer: full_shard with auto_wrap by layer)")
        need(not self.fsdp or not self.use_lora, "fsdp", "shards full fine-tuning: set use_lora: false, or "
             "remove fsdp (LoRA runs under torchrun with DDP)")
        need(not self.fsdp or not self.eight_bit_optimizer, "optim", f"{self.optim} keeps 8-bit moments in "
             "blocks of 256 elements, which FSDP2's shards would split: use adamw_torch with fsdp")
        need(self.sample_max_new_tokens >= 1, "sample_max_new_tokens", "must be at least 1")
        if self.eval_file is not None and self.eval_split > 0:
            raise ThriftyError(f"eval_file and eval_split = {self.eval_split} are both set; use one: an eval "
                               "file, or a fraction of train_file held out.")


RESUME_MUST_MATCH = (*SHARED_RESUME_MUST_MATCH, "packing", "max_length", "format",
                     "completion_only_loss", "eval_split")


def load_sft_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> SFTConfig:
    """SFTConfig from a YAML file and `key=value` overrides.

    A relative data or model path that does not exist from the working directory is
    looked up next to the YAML file, so `thrifty sft examples/sft_default.yaml` works
    from anywhere while paths relative to where you run keep working too.
    """
    config = load_config(SFTConfig, path, overrides)
    resolve_next_to(config, path, ("train_file", "eval_file", "model_name_or_path"))
    return config

"""TrainingConfig: the fields SFTConfig and GRPOConfig share, with TRL's names.

As TRL's SFTConfig and GRPOConfig share transformers' TrainingArguments, Thrifty's two
run configs share this base; a subclass redeclares a field only to change its default
(GRPO's learning rate, schedule, logging, checkpointing), and the names stay flat
(`learning_rate`, not `optim.learning_rate`) in YAML and on the command line. Torch-free,
so a YAML file is checked before any model code loads.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Literal

from thrifty.config_io import require
from thrifty.errors import ThriftyError
from thrifty.model.config import DTYPE_NAMES

# What training computes in: float16 has no CPU kernels here (the fused losses, attention
# and optimizer take bf16 or float32), and bf16 has float32's range, so use that instead.
TRAINING_DTYPES = tuple(name for name, dtype in DTYPE_NAMES.items() if dtype != "float16")

# transformers' `optim` names Thrifty answers, all AdamW (training/optim.py): the 8-bit
# ones keep bitsandbytes' block-wise 8-bit moments (training/adamw_8bit.py), the others
# float32 moments. Paging is a CUDA unified-memory feature: on a CPU the paged ones are
# their unpaged namesakes, and say so in the log.
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit",
              "paged_adamw_32bit")
EIGHT_BIT_OPTIMIZERS = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit")
REPORT_TO = ("none", "tensorboard")


def launched_world_size() -> int:
    """The number of processes torchrun launched (its WORLD_SIZE; 1 without torchrun).
    Batch sizes per device multiply by it, as in TRL and transformers."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class TrainingConfig:
    # -- model ------------------------------------------------------------------------
    model_name_or_path: str | None = None  # None: the built-in SmolLM2-135M-Instruct
    dtype: str = "bfloat16"  # of the base weights and activations: bfloat16 or float32

    # -- optimisation -----------------------------------------------------------------
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4  # a LoRA rate; full fine-tuning wants ~1e-5
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0  # wins over warmup_ratio when > 0
    warmup_ratio: float = 0.0
    max_steps: int = -1  # > 0: train exactly this many optimizer steps (overrides epochs)
    num_train_epochs: float = 3.0
    optim: str = "adamw_torch"  # transformers' name; see OPTIMIZERS
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    # Thrifty's own: stop when this many optimizer steps in a row that should have moved
    # the weights had gradients of exactly zero (a collapsed model: a finite divergence
    # saturated the softmax); 0 never stops.
    max_zero_gradient_steps: int = 5
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward
    # Keep the MLP's gate/up outputs too, so the recomputation skips the MLP's matmuls
    # (a GRPO update: 11% faster) for 2 x intermediate_size more values per token and
    # layer (~5x the layer input kept otherwise).
    gradient_checkpointing_keep_mlp: bool = False
    # The same for the q/k/v outputs and the attention output (~2.7x the layer input
    # more per token and layer): the recomputation skips the q/k/v matmuls and the
    # attention forward as well.
    gradient_checkpointing_keep_attention: bool = False
    seed: int = 42
    # transformers' precision switches, for code written for a GPU: fp16 (which Unsloth's
    # notebooks set on any machine without bf16 CUDA) trains in bfloat16 here, with a notice;
    # bf16 = fp16 = false trains in float32. None: dtype decides.
    bf16: bool | None = None
    fp16: bool | None = None

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
    # The frozen base under LoRA: nf4 (QLoRA), int8, or gguf (a GGUF file's own blocks, as it is)
    quantize: Literal["nf4", "int8", "gguf"] | None = None
    # A LoRA adapter (PEFT directory) to continue training, e.g. GRPO after an SFT cold start;
    # it brings its own rank and targets (the lora_* fields are then unused).
    adapter: str | None = None

    # -- logging, evaluation, checkpoints ---------------------------------------------------
    output_dir: str = "output/run"
    # A fresh run (no resume_from_checkpoint) into an output_dir that holds another run's
    # checkpoints stops, unless this deletes them first (transformers' name).
    overwrite_output_dir: bool = False
    logging_steps: int = 10
    eval_steps: int | None = None  # None: evaluate at the end only
    eval_on_start: bool = False  # also evaluate before the first step (to see the improvement)
    save_steps: int = 500  # 0: no intermediate checkpoints
    save_strategy: Literal["steps", "no"] = "steps"  # transformers' name: "no" = no intermediate checkpoints
    save_total_limit: int | None = 2  # keep only the newest N checkpoints; None keeps all
    resume_from_checkpoint: str | bool | None = None  # a checkpoint dir, or "latest" / true
    disable_tqdm: bool = False
    report_to: str | list[str] = "none"  # "tensorboard" also writes event files to output_dir/runs
    dataset_num_proc: int | None = None  # accepted for TRL code; tokenizing here is one process

    def check_shared_fields(self) -> None:
        """The checks of the shared fields (the subclasses' __post_init__ call it); turns a
        comma-separated lora_target_modules (`lora_target_modules=q_proj,v_proj` on the
        command line) into a list."""
        need = partial(require, self)
        if self.dtype in DTYPE_NAMES and self.dtype not in TRAINING_DTYPES:
            raise ThriftyError(f"dtype = {self.dtype!r}: training runs in bfloat16 or float32 (float16 has no CPU "
                               "kernels here, and bfloat16 keeps float32's range so it needs no loss scaling); "
                               "use dtype: bfloat16.")
        need(self.dtype in TRAINING_DTYPES, "dtype", f"use one of {', '.join(TRAINING_DTYPES)}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            need(getattr(self, name) >= 1, name, "must be at least 1")
        need(math.isfinite(self.learning_rate) and self.learning_rate > 0, "learning_rate",
             "must be a positive number")
        need(self.warmup_steps >= 0, "warmup_steps", "must be 0 or more")
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be a fraction in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "must be 0 or more")
        need(0.0 <= self.adam_beta1 < 1.0, "adam_beta1", "must be in [0, 1)")
        need(0.0 <= self.adam_beta2 < 1.0, "adam_beta2", "must be in [0, 1)")
        need(self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm), "max_grad_norm",
             "must be 0 (no clipping) or a positive number")
        need(self.max_zero_gradient_steps >= 0, "max_zero_gradient_steps", "must be 0 (never stop) or more")
        need(self.lora_r >= 1, "lora_r", "must be at least 1")
        need(self.lora_alpha > 0, "lora_alpha", "must be positive")
        need(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
        need(self.eval_steps is None or self.eval_steps >= 1, "eval_steps", "must be at least 1, or null")
        need(self.save_steps >= 0, "save_steps", "must be 0 (no checkpoints) or more")
        need(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit",
             "must be at least 1, or null to keep every checkpoint")
        need(self.save_strategy in ("steps", "no"), "save_strategy", "use 'steps' (every save_steps) or 'no'")
        if self.save_strategy == "no":
            self.save_steps = 0
        need(self.optim in OPTIMIZERS, "optim", f"use one of {', '.join(OPTIMIZERS)} (all run AdamW)")
        for target in self.report_targets:
            need(target in REPORT_TO, "report_to", f"{target!r} is not supported: Thrifty writes metrics.jsonl and "
                 f"a plot itself; use one of {', '.join(REPORT_TO)}")
        self._apply_precision_switches()
        if isinstance(self.lora_target_modules, str) and "," in self.lora_target_modules:
            self.lora_target_modules = [t.strip() for t in self.lora_target_modules.split(",") if t.strip()]
        if self.quantize is not None and not self.use_lora:
            raise ThriftyError(f"quantize = {self.quantize!r} needs use_lora: true. A quantized base model is "
                               "frozen, so only LoRA adapters can be trained on it (QLoRA). Set use_lora: true, "
                               "or quantize: null for full fine-tuning.")

    def _apply_precision_switches(self) -> None:
        wanted = ("bfloat16" if self.bf16 or self.fp16 else
                  "float32" if self.bf16 is False and self.fp16 is False else None)
        if wanted is None or wanted == self.dtype:
            return
        if self.dtype != "bfloat16":  # set by hand, and not what bf16/fp16 ask for
            raise ThriftyError(f"dtype = {self.dtype!r} and bf16 = {self.bf16}, fp16 = {self.fp16} disagree; set "
                               "one of them.")
        self.dtype = wanted

    @property
    def report_targets(self) -> list[str]:
        targets = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to or [])
        return [t for t in targets if t != "none"]

    def notices(self) -> list[str]:
        """One line for each setting that runs differently from what its name says in TRL."""
        out = []
        if self.fp16:
            out.append("fp16 = true: training runs in bfloat16 (no float16 kernels on a CPU; bfloat16 has "
                       "float32's range, so no loss scaling is needed).")
        if self.optim.startswith("paged_"):
            out.append(f"optim = {self.optim}: runs as {self.optim.removeprefix('paged_')} (paging is a CUDA "
                       "unified-memory feature; on a CPU the state is in RAM either way).")
        return out

    @property
    def eight_bit_optimizer(self) -> bool:
        """AdamW with bitsandbytes' block-wise 8-bit moments (2 bytes of state per weight, not 8)."""
        return self.optim in EIGHT_BIT_OPTIMIZERS


# Settings a checkpoint must have been trained with to be resumed exactly: the model, the
# method, and what orders and batches the data (the run configs add their own).
# The batch fields are not here: a resumed run may split the same global batch differently
# (another number of processes, or of micro-batches); the trainers check the global batch.
RESUME_MUST_MATCH = ("model_name_or_path", "adapter", "dtype", "use_lora", "lora_r", "lora_alpha", "lora_target_modules",
                     "use_rslora", "use_dora", "quantize", "seed", "optim")

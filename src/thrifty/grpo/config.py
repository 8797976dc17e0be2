"""GRPOConfig: every knob of a GRPO run, with TRL's field names and meanings.

Someone coming from TRL's GRPOConfig should recognise every name. The differences,
all because one CPU process is the whole "cluster" here:

* per_device_train_batch_size counts PROMPTS per step (TRL counts completions per
  micro-batch). Each step samples num_generations completions for each of these
  prompts, then splits the per_device_train_batch_size * num_generations completions
  into gradient_accumulation_steps micro-batches for the backward pass.
* max_steps counts GRPO steps (rollouts); each step makes num_iterations optimizer
  updates on its rollout (TRL counts optimizer updates).
* task / task_settings pick a built-in verifiable task (thrifty.grpo.tasks) that supplies
  the prompts, the reward functions and an exact checker for accuracy.

Load one from YAML with `load_grpo_config(path, ["key=value", ...])`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Sequence

from thrifty.config_io import load_config, require, resolve_next_to
from thrifty.errors import ThriftyError
from thrifty.grpo.loss import LOSS_TYPES, SCALE_REWARDS
from thrifty.formats.loader import DTYPES
from thrifty.training.setup import check_method_fields


@dataclass
class GRPOConfig:
    # -- model ------------------------------------------------------------------------
    model_name_or_path: str | None = None  # None: the built-in SmolLM2-135M-Instruct
    dtype: str = "bfloat16"

    # -- data: a built-in task, or your own rows / file -----------------------------------
    task: str | None = None  # e.g. "arithmetic", "countdown", "gsm" (see thrifty.grpo.tasks)
    task_settings: dict[str, Any] = field(default_factory=dict)  # e.g. {operand_digits: [1, 1]}
    num_train_prompts: int = 2000  # task rows drawn for training
    train_file: str | None = None  # .jsonl/.json/.csv/.parquet with a `prompt` column (or pass rows)
    system_prompt: str | None = None  # added to chat prompts that have none
    max_prompt_length: int | None = 512  # longer prompts keep their last tokens (as TRL)

    # -- generation ---------------------------------------------------------------------
    num_generations: int = 8  # completions per prompt (the group)
    max_completion_length: int = 256
    # Stop tokens get no probability before this many tokens (transformers' min_new_tokens;
    # = max_completion_length makes every completion that long, as benchmarks/bench_grpo.py's
    # --fixed-length does on both engines).
    min_completion_length: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0

    # -- the GRPO objective ----------------------------------------------------------------
    beta: float = 0.0  # KL coefficient (k3, to the reference model); 0 as TRL >= 0.19
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: = epsilon (DAPO's clip-higher uses e.g. 0.28)
    num_iterations: int = 1  # optimizer updates per rollout (PPO epochs, "mu")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    mask_truncated_completions: bool = False
    reward_weights: list[float] | None = None  # None: the task's weights, else all 1
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill
    max_dynamic_sampling_draws: int = 3  # rollouts per step at most when refilling

    # -- optimisation -----------------------------------------------------------------
    per_device_train_batch_size: int = 4  # PROMPTS per step (see the module docstring)
    gradient_accumulation_steps: int = 1  # micro-batches the step's completions are split into
    learning_rate: float = 1e-5
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_steps: int = 100
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    # On, as in TRL's GRPOConfig: measured on the arithmetic demo, peak RSS 1.6 GB instead of
    # 4.0 GB (32 completions of 64 tokens) for ~20% more training time.
    gradient_checkpointing: bool = True
    # With checkpointing, also keep each layer's MLP gate/up outputs (2 x intermediate_size
    # values per token) so the recomputation skips the MLP's matmuls: measured on the
    # benchmark's 4 x 8 x 64 rollouts, an update took 3.44 s instead of 3.88 (plain: 2.85).
    gradient_checkpointing_keep_mlp: bool = True
    # And keep each layer's q/k/v outputs and attention output, so the recomputation skips
    # the q/k/v matmuls and the attention forward as well (~2.7x the layer input more per
    # token and layer): see README "GRPO" for the measured update time and memory.
    gradient_checkpointing_keep_attention: bool = True
    seed: int = 42

    # -- method: LoRA / QLoRA / full ----------------------------------------------------
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    quantize: Literal["nf4", "int8"] | None = None

    # -- logging, evaluation, checkpoints ---------------------------------------------------
    output_dir: str = "output/grpo"
    logging_steps: int = 1
    log_completions: int = 4  # sample completions per step written to completions.jsonl
    eval_steps: int | None = None  # None: held-out accuracy before and after training only
    num_eval_samples: int = 100  # held-out task problems for accuracy (0: no evaluation)
    eval_on_start: bool = True
    save_steps: int = 50  # 0: no intermediate checkpoints
    save_total_limit: int | None = 2
    resume_from_checkpoint: str | bool | None = None  # a checkpoint dir, or "latest" / true
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        need = partial(require, self)
        need(self.dtype in DTYPES, "dtype", f"use one of {', '.join(DTYPES)}")
        for name in ("num_generations", "max_completion_length", "num_iterations", "per_device_train_batch_size",
                     "gradient_accumulation_steps", "max_steps", "logging_steps",
                     "max_dynamic_sampling_draws", "num_train_prompts"):
            need(getattr(self, name) >= 1, name, "must be at least 1")
        need(self.num_generations >= 2, "num_generations",
             "must be at least 2: GRPO's advantages compare completions of the same prompt")
        need(self.max_prompt_length is None or self.max_prompt_length >= 1, "max_prompt_length",
             "must be at least 1, or null")
        need(0 <= self.min_completion_length <= self.max_completion_length, "min_completion_length",
             "must be between 0 and max_completion_length")
        need(self.temperature > 0, "temperature", "must be positive: GRPO needs sampled (varied) completions")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.top_k >= 0, "top_k", "must be 0 (off) or more")
        need(0 <= self.min_p < 1, "min_p", "must be in [0, 1)")
        need(self.beta >= 0, "beta", "must be 0 or more")
        need(self.epsilon > 0, "epsilon", "must be positive")
        need(self.epsilon_high is None or self.epsilon_high > 0, "epsilon_high", "must be positive, or null")
        need(self.loss_type in LOSS_TYPES, "loss_type", f"use one of {', '.join(LOSS_TYPES)}")
        need(self.scale_rewards in SCALE_REWARDS, "scale_rewards", f"use one of {', '.join(SCALE_REWARDS)}")
        need(self.learning_rate > 0, "learning_rate", "must be positive")
        need(self.warmup_steps >= 0, "warmup_steps", "must be 0 or more")
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be a fraction in [0, 1)")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be 0 (no clipping) or more")
        need(self.eval_steps is None or self.eval_steps >= 1, "eval_steps", "must be at least 1, or null")
        need(self.num_eval_samples >= 0, "num_eval_samples", "must be 0 or more")
        need(self.log_completions >= 0, "log_completions", "must be 0 or more")
        need(self.save_steps >= 0, "save_steps", "must be 0 (no checkpoints) or more")
        need(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit",
             "must be at least 1, or null to keep every checkpoint")
        completions = self.per_device_train_batch_size * self.num_generations
        need(self.gradient_accumulation_steps <= completions, "gradient_accumulation_steps",
             f"must not exceed the {completions} completions of a step (per_device_train_batch_size x "
             "num_generations), or some micro-batches would be empty")
        check_method_fields(self)
        if self.task is not None and self.train_file is not None:
            raise ThriftyError(f"task = {self.task!r} and train_file = {self.train_file!r} are both set; use one: "
                               "a built-in task supplies its own prompts.")


def load_grpo_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> GRPOConfig:
    """GRPOConfig from a YAML file and `key=value` overrides; a relative train_file or
    model path that does not exist from here is looked up next to the YAML file."""
    config = load_config(GRPOConfig, path, overrides)
    resolve_next_to(config, path, ("train_file", "model_name_or_path"))
    return config

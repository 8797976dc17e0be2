"""GRPOConfig: every knob of a GRPO run, with TRL's field names and meanings.

Someone coming from TRL's GRPOConfig should recognise every name, and the batch fields
count what they count in TRL:

* per_device_train_batch_size: completions per micro-batch (one forward/backward);
* gradient_accumulation_steps: micro-batches per optimizer step;
* generation_batch_size / steps_per_generation (set one; default steps_per_generation =
  gradient_accumulation_steps): one generation samples generation_batch_size =
  per_device_train_batch_size x processes x steps_per_generation completions (processes:
  torchrun's world size, 1 without it), num_generations for
  each of generation_batch_size / num_generations prompts, and feeds
  steps_per_generation micro-batches, i.e. steps_per_generation /
  gradient_accumulation_steps optimizer steps, num_iterations times over;
* max_steps: optimizer steps (as logging_steps, save_steps and eval_steps).

So the default run generates one batch per optimizer step. Where Thrifty differs from TRL:
it splits a generation batch in order (each prompt's group stays together, so a
micro-batch holds the prompt once) where TRL shuffles the completions first, and
steps_per_generation must be a multiple of gradient_accumulation_steps (an optimizer
step never spans two generations). task / task_settings pick a built-in verifiable task
(thrifty.grpo.tasks) that supplies the prompts, the reward functions and an exact
checker for accuracy.

Load one from YAML with `load_grpo_config(path, ["key=value", ...])`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Sequence

from thrifty.config_io import load_config, refuse_unknown_fields, require, resolve_next_to
from thrifty.errors import ThriftyError
from thrifty.grpo.tasks import check_task_settings
from thrifty.training.config import RESUME_MUST_MATCH as SHARED_RESUME_MUST_MATCH
from thrifty.training.config import TrainingConfig, launched_world_size

LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")  # see grpo/loss.py
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")
IMPORTANCE_SAMPLING_MODES: tuple[str, ...] = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
IMPORTANCE_SAMPLING_QUANTIZATIONS: tuple[str, ...] = ("q8_0", "q4_0")  # kernels/gguf_blocks.QUANTIZE_TO


@refuse_unknown_fields
@dataclass
class GRPOConfig(TrainingConfig):
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
    use_vllm: bool = False  # TRL's; Thrifty's own engine generates (vLLM needs a GPU)
    # Sample the rollouts from a copy of the model quantized to GGUF blocks ("q8_0", "q4_0";
    # Thrifty's own field), while training updates the weights themselves. The mismatch
    # between the two is corrected as TRL corrects vLLM's, with TRL's fields below.
    rollout_quantization: Literal["q8_0", "q4_0"] | None = None
    vllm_importance_sampling_correction: bool = True  # applies only with rollout_quantization
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate",
                                           "sequence_mask"] = "sequence_mask"
    vllm_importance_sampling_clip_max: float | None = 3.0
    vllm_importance_sampling_clip_min: float | None = None

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

    # -- batches, as TRL counts them (see the module docstring) --------------------------------
    per_device_train_batch_size: int = 8  # completions per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    steps_per_generation: int | None = None  # micro-batches per generation; None: gradient_accumulation_steps
    generation_batch_size: int | None = None  # completions per generation (instead of steps_per_generation)

    # -- optimisation: TrainingConfig's fields with GRPO's defaults ---------------------------
    learning_rate: float = 1e-5
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "constant"
    adam_beta2: float = 0.99
    # On, as in TRL's GRPOConfig: measured on the arithmetic demo, peak RSS 1.6 GB instead of
    # 4.0 GB (32 completions of 64 tokens) for ~20% more training time.
    gradient_checkpointing: bool = True
    # Measured on the benchmark's 4 x 8 x 64 rollouts: an update took 3.44 s with the MLP's
    # outputs kept instead of 3.88 (plain: 2.85); keeping the attention's too: see README "GRPO".
    gradient_checkpointing_keep_mlp: bool = True
    gradient_checkpointing_keep_attention: bool = True

    # -- logging, evaluation, checkpoints ---------------------------------------------------
    output_dir: str = "output/grpo"
    logging_steps: int = 1
    # TRL's fields: whether sampled completions are logged (completions.jsonl; TRL's default
    # is false, and it prints them), and how many per logging step (None: all).
    log_completions: bool = True
    num_completions_to_print: int | None = 4
    eval_steps: int | None = None  # None: held-out accuracy before and after training only
    num_eval_samples: int = 100  # held-out task problems for accuracy (0: no evaluation)
    eval_on_start: bool = True
    save_steps: int = 50  # 0: no intermediate checkpoints

    def __post_init__(self) -> None:
        self.check_shared_fields()
        need = partial(require, self)
        for name in ("num_generations", "max_completion_length", "num_iterations",
                     "max_dynamic_sampling_draws", "num_train_prompts"):
            need(getattr(self, name) >= 1, name, "must be at least 1")
        need(self.num_generations >= 2, "num_generations",
             "must be at least 2: GRPO's advantages compare completions of the same prompt")
        need(self.max_prompt_length is None or self.max_prompt_length >= 1, "max_prompt_length",
             "must be at least 1, or null")
        need(0 <= self.min_completion_length <= self.max_completion_length, "min_completion_length",
             "must be between 0 and max_completion_length")
        need(self.temperature > 0, "temperature", "must be positive: GRPO needs sampled (varied) completions")
        if self.task is not None:  # typed per task, here rather than in the first reward
            check_task_settings(self.task, self.task_settings)
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.top_k >= 0, "top_k", "must be 0 (off) or more")
        need(0 <= self.min_p < 1, "min_p", "must be in [0, 1)")
        need(not self.use_vllm, "use_vllm", "must be false: Thrifty generates with its own engine (vLLM needs a "
             "GPU server); remove it")
        self._check_rollout_fields()
        need(self.beta >= 0, "beta", "must be 0 or more")
        need(self.epsilon > 0, "epsilon", "must be positive")
        need(self.epsilon_high is None or self.epsilon_high > 0, "epsilon_high", "must be positive, or null")
        need(self.loss_type in LOSS_TYPES, "loss_type", f"use one of {', '.join(LOSS_TYPES)}")
        need(self.scale_rewards in SCALE_REWARDS, "scale_rewards", f"use one of {', '.join(SCALE_REWARDS)}")
        need(self.num_eval_samples >= 0, "num_eval_samples", "must be 0 or more")
        need(isinstance(self.log_completions, bool), "log_completions",
             "is true or false, as in TRL; the number of completions logged is num_completions_to_print")
        need(self.num_completions_to_print is None or self.num_completions_to_print >= 0, "num_completions_to_print",
             "must be 0 or more, or null for all")
        self._check_batch_fields()
        if self.task is not None and self.train_file is not None:
            raise ThriftyError(f"task = {self.task!r} and train_file = {self.train_file!r} are both set; use one: "
                               "a built-in task supplies its own prompts.")

    def _check_rollout_fields(self) -> None:
        need = partial(require, self)
        need(self.rollout_quantization in (None, *IMPORTANCE_SAMPLING_QUANTIZATIONS), "rollout_quantization",
             f"use one of {', '.join(IMPORTANCE_SAMPLING_QUANTIZATIONS)}, or null")
        need(self.rollout_quantization is None or self.quantize is None, "rollout_quantization",
             f"must be null when quantize = {self.quantize!r}: the model's weights are quantized already and "
             "the rollouts sample from them")
        need(self.vllm_importance_sampling_mode in IMPORTANCE_SAMPLING_MODES, "vllm_importance_sampling_mode",
             f"use one of {', '.join(IMPORTANCE_SAMPLING_MODES)}")
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        need(low is None or high is None or low < high, "vllm_importance_sampling_clip_min",
             f"({low}) must be less than vllm_importance_sampling_clip_max ({high})")
        need(not (self.vllm_importance_sampling_correction and self.vllm_importance_sampling_mode.endswith("truncate")
                  and low is None and high is None), "vllm_importance_sampling_clip_max",
             "or vllm_importance_sampling_clip_min must be set for a *_truncate vllm_importance_sampling_mode")

    def _check_batch_fields(self) -> None:
        need = partial(require, self)
        accumulation = self.gradient_accumulation_steps
        bs = self.per_device_train_batch_size * self.world_size  # completions per micro-batch, all ranks
        per = "per_device_train_batch_size" + (f" x {self.world_size} processes" if self.world_size > 1 else "")
        if self.steps_per_generation is not None:
            need(self.steps_per_generation >= 1, "steps_per_generation", "must be at least 1, or null")
            need(self.generation_batch_size in (None, bs * self.steps_per_generation), "generation_batch_size",
                 f"and steps_per_generation are both set and disagree ({per} x steps_per_generation = "
                 f"{bs * self.steps_per_generation}); set one (as in TRL)")
        if self.generation_batch_size is not None:
            need(self.generation_batch_size >= 1 and self.generation_batch_size % bs == 0, "generation_batch_size",
                 f"must be a multiple of {per} = {bs}")
        need(self.micro_batches_per_generation % accumulation == 0, "steps_per_generation",
             f"(= {self.micro_batches_per_generation} micro-batches per generation) must be a multiple of "
             f"gradient_accumulation_steps = {accumulation}: Thrifty never spans an optimizer step across two "
             "generations")
        need(self.completions_per_generation % self.num_generations == 0, "generation_batch_size",
             f"(= {self.completions_per_generation} completions per generation: {per} x "
             f"steps_per_generation) must be a multiple of num_generations = {self.num_generations}, so every "
             "prompt gets its whole group")
        need(self.max_steps > 0 or self.num_train_epochs > 0, "num_train_epochs", "must be positive (or set max_steps)")

    @property
    def world_size(self) -> int:
        """Processes launched by torchrun (1 without it): as in TRL, a generation holds
        per_device_train_batch_size x world_size x steps_per_generation completions."""
        return launched_world_size()

    @property
    def micro_batches_per_generation(self) -> int:
        """steps_per_generation: micro-batches per generation on each rank."""
        if self.steps_per_generation is not None:
            return self.steps_per_generation
        if self.generation_batch_size is not None:
            return max(self.generation_batch_size // (self.per_device_train_batch_size * self.world_size), 1)
        return self.gradient_accumulation_steps

    @property
    def completions_per_generation(self) -> int:
        """generation_batch_size: completions per generation, all ranks together."""
        return self.per_device_train_batch_size * self.world_size * self.micro_batches_per_generation

    @property
    def prompts_per_generation(self) -> int:
        return self.completions_per_generation // self.num_generations

    @property
    def updates_per_generation(self) -> int:
        """Optimizer steps each generation feeds (num_iterations passes over its micro-batches)."""
        return self.micro_batches_per_generation // self.gradient_accumulation_steps * self.num_iterations


RESUME_MUST_MATCH = (*SHARED_RESUME_MUST_MATCH, "num_iterations", "task", "task_settings", "num_train_prompts", "train_file",
                     "num_generations", "dynamic_sampling")


def load_grpo_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> GRPOConfig:
    """GRPOConfig from a YAML file and `key=value` overrides; a relative train_file or
    model path that does not exist from here is looked up next to the YAML file."""
    config = load_config(GRPOConfig, path, overrides)
    resolve_next_to(config, path, ("train_file", "model_name_or_path"))
    return config

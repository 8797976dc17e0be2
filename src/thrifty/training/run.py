"""TrainingRun: what an SFT and a GRPO run do around their loops, written once.

The model prepared as the config says (the method decided once: full, LoRA or QLoRA,
seeded first so adapters start the same in every run), its optimizer and learning-rate
schedule, the output directory held by one run at a time, checkpoints saved and resumed,
activation checkpointing switched on for the loop, and the whole optimizer step: the
step's learning rate, clipping, a refusal to apply NaN or infinite gradients, and the
weights epoch it advances; with it the inference plan generation runs on. Under
torchrun, the process group (`dist`), with rank 0 alone printing and writing. The
trainers own their loops and their own state; this object owns the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from torch import nn

from thrifty.config_io import dump_yaml
from thrifty.errors import ThriftyError
from thrifty.formats.atomic import remove_stale_temporaries
from thrifty.formats.default_model import DEFAULT_MODEL_NAME
from thrifty.formats.hf_export import hf_state_dict
from thrifty.formats.open_model import attach_adapter
from thrifty.kernels.malloc_tuning import returning_freed_memory
from thrifty.model.activation_checkpointing import disable_activation_checkpointing, enable_activation_checkpointing
from thrifty.model.inference_plan import InferencePlan
from thrifty.model.weights_epoch import advance_weights_epoch
from thrifty.training.checkpoint import (
    checkpoint_dir, checkpoint_step, find_latest_checkpoint, list_checkpoints, resume_from, rng_state, save_checkpoint,
    save_trained_model,
    setting_differences, settings_must_match,
)
from thrifty.training.config import TrainingConfig
from thrifty.training.distributed import Distributed
from thrifty.training.optim import MasterWeightAdamW, NonFiniteGradients
from thrifty.training.schedule import lr_factor, warmup_steps_for
from thrifty.training.setup import TrainingMethod, decide_method, prepare_model, set_seed

LOCK_NAME = ".thrifty-run.lock"
# What a finished run leaves in output_dir besides its checkpoints: data a new run must
# not replace unless told to (overwrite_output_dir).
RUN_RESULTS = ("adapter", "model", "metrics.jsonl", "completions.jsonl", "samples.json", "loss.png", "rewards.png")


@dataclass(frozen=True)
class Schedule:
    """The learning rate of every optimizer step of a run of `total_steps`."""

    learning_rate: float
    total_steps: int
    warmup_steps: int
    kind: str

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step `step` (1-based)."""
        return self.learning_rate * lr_factor(step - 1, self.total_steps, self.warmup_steps, self.kind)  # type: ignore[arg-type]


@dataclass(frozen=True)
class AppliedStep:
    grad_norm: float  # before clipping
    lr: float


class TrainingRun:
    def __init__(self, model: nn.Module, tokenizer: Any, config: TrainingConfig, must_match: Sequence[str],
                 log: Callable[[str], None]) -> None:
        self.dist = Distributed.from_env()
        self.log = log if self.dist.is_main else _quiet
        log = self.log
        self.tokenizer = tokenizer
        self.must_match = tuple(must_match)
        for notice in config.notices():
            log(notice)
        self.method: TrainingMethod = decide_method(model, config)
        if config.quantize != self.method.quantize:  # a base quantized before the run: record how
            config = dataclasses.replace(config, quantize=self.method.quantize)
        self.config = config
        set_seed(config.seed)  # before LoRA init, so adapters start the same in every run
        self.model = prepare_model(model, config, self.method, self._continue_from_adapter)
        advance_weights_epoch(self.model)
        self._plan: InferencePlan | None = None
        self.schedule: Schedule | None = None
        if getattr(config, "fsdp", ""):
            if self.dist.enabled:
                self.dist.shard_model(self.model)
            else:
                log("fsdp: one process, nothing to shard (launch with torchrun --nproc-per-node N)")
        self.optimizer = MasterWeightAdamW(self.model.named_parameters(), lr=config.learning_rate,
                                           betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                                           weight_decay=config.weight_decay, eight_bit=config.eight_bit_optimizer)
        self.output_dir = Path(config.output_dir)
        self.zero_gradient_steps = 0  # in a row, of the steps that expected gradients

    @property
    def tensorboard_dir(self) -> Path | None:
        """Where TensorBoard event files go, if report_to asks for them."""
        return self.output_dir / "runs" if "tensorboard" in self.config.report_targets else None

    @property
    def base_model_name(self) -> str:
        return self.config.model_name_or_path or DEFAULT_MODEL_NAME

    def _continue_from_adapter(self, model: nn.Module) -> None:
        attach_adapter(model, self.config.adapter, self.base_model_name, self.log)
        self.log(f"continuing from the adapter {self.config.adapter} (its rank and targets; the lora_* settings "
                 "are unused)")

    def set_total_steps(self, total_steps: int) -> Schedule:
        """The run's length in optimizer steps, which fixes its learning-rate schedule."""
        config = self.config
        self.schedule = Schedule(config.learning_rate, total_steps,
                                 warmup_steps_for(total_steps, config.warmup_steps, config.warmup_ratio),
                                 config.lr_scheduler_type)
        return self.schedule

    def inference_plan(self, quantization: str | None = None) -> InferencePlan:
        """What generation inside the run (rollouts, evaluation) runs on: one plan, rebuilt
        when the weights have changed since (reusing the frozen base's packed weights).
        FSDP2's sharded weights exist whole only inside each layer's forward, so a sharded
        model's plan runs the modules themselves. quantization: the plan's base weights as
        GGUF blocks (InferencePlan.build)."""
        if self._plan is None or self._plan.quantization != quantization:
            self._plan = None  # the old plan's copies go before the new ones are made
            self._plan = InferencePlan.build(self.model, fuse=not self.dist.sharded, quantization=quantization)
        self._plan = self._plan.for_current_weights()
        return self._plan

    # ------------------------------------------------------------------ the output directory

    @contextlib.contextmanager
    def holding_output_dir(self) -> Iterator[None]:
        """output_dir created and held for the block: a second run into it stops at once, and
        a fresh run will not start over another run's checkpoints unless overwrite_output_dir.
        Under torchrun rank 0 holds it, and the other ranks start once it has."""
        if not self.dist.is_main:
            self.dist.barrier()
            yield
            return
        lock = _lock_directory(_make_output_dir(self.output_dir))
        try:
            remove_stale_temporaries(self.output_dir)
            if not self.config.resume_from_checkpoint:
                self._clear_for_a_fresh_run()
            self.dist.barrier()
            yield
        finally:
            lock.close()  # closing the file releases the lock (so does the process dying)

    def _clear_for_a_fresh_run(self) -> None:
        for path in earlier_run(self.config):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    # ------------------------------------------------------------------ the loop

    @contextlib.contextmanager
    def checkpointed_layers(self) -> Iterator[None]:
        """Activation checkpointing as the config asks, for the loop only (it acts where
        gradients are on, so generation inside the loop is not affected)."""
        config = self.config
        if config.gradient_checkpointing:
            enable_activation_checkpointing(self.model, keep_mlp_outputs=config.gradient_checkpointing_keep_mlp,
                                            keep_attention_outputs=config.gradient_checkpointing_keep_attention)
        try:
            yield
        finally:
            if config.gradient_checkpointing:
                disable_activation_checkpointing(self.model)
                returning_freed_memory(False)  # a step the run did not finish may have left it on

    def forward(self, fn: Callable[..., Any], *args: Any, sync: bool = True) -> Any:
        """fn(model, *args) for a loss to backpropagate: under torchrun through DDP, which
        averages the gradients over the ranks in the backward when `sync` (pass False for
        every micro-batch of an optimizer step but the last). With checkpointing, freed
        memory goes back to the system until the optimizer step (kernels/malloc_tuning.py):
        a fragmented heap would keep more than checkpointing saves."""
        if self.config.gradient_checkpointing:
            returning_freed_memory(True)
        return self.dist.ddp_forward(self.model, fn, *args, sync=sync)

    def optimizer_step(self, step: int, expects_gradients: bool = True) -> AppliedStep:
        """Clip and apply the accumulated gradients of optimizer step `step` (1-based) at
        the schedule's learning rate, advancing the weights epoch. Stops the run, updating
        nothing, when the gradients are NaN or infinite: training on from there only
        spreads them into every weight. Stops it too after max_zero_gradient_steps steps in
        a row of exactly zero gradients where the loss had something to teach
        (`expects_gradients`: GRPO's steps whose advantages are all zero teach nothing)."""
        if self.schedule is None:
            raise RuntimeError("set_total_steps() before the first optimizer step")
        lr = self.schedule.lr(step)
        self.optimizer.set_lr(lr)
        try:
            grad_norm = self.optimizer.step(self.config.max_grad_norm)
        except NonFiniteGradients as error:
            latest = find_latest_checkpoint(self.output_dir)
            raise ThriftyError(
                f"step {step}: the gradients are {error.norm} (the loss diverged or a value overflowed); the run "
                f"stops without applying them. Last good checkpoint: {latest or 'none yet'}. Lower learning_rate "
                f"(now {self.config.learning_rate:g}) or max_grad_norm, or check the data, then resume from it."
            ) from error
        finally:
            self.optimizer.zero_grad()
            returning_freed_memory(False)  # rollouts and evaluation reuse freed memory: faster
        advance_weights_epoch(self.model, trainable_only=True)
        if expects_gradients:
            self.zero_gradient_steps = self.zero_gradient_steps + 1 if grad_norm == 0.0 else 0
            self._stop_if_collapsed(step)
        return AppliedStep(grad_norm, lr)

    def _stop_if_collapsed(self, step: int) -> None:
        limit = self.config.max_zero_gradient_steps
        if not limit or self.zero_gradient_steps < limit:
            return
        # The first zero-gradient step ran on the weights of the step before it: collapsed.
        collapsed_at = step - self.zero_gradient_steps
        good = [c for c in list_checkpoints(self.output_dir) if checkpoint_step(c) < collapsed_at]
        raise ThriftyError(
            f"step {step}: the gradients have been exactly zero for {self.zero_gradient_steps} steps in a row: the "
            f"model collapsed at step {collapsed_at} (a finite divergence saturates the softmax: the loss sits at "
            f"the uniform level, ln(vocabulary) = {math.log(self.model.config.vocab_size):.3f}, and nothing moves). "
            f"Last good checkpoint: {good[-1] if good else 'none'}. Lower learning_rate (now "
            f"{self.config.learning_rate:g}) and resume from it or start afresh; max_zero_gradient_steps: 0 turns "
            "this check off.")

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Rank 0 writes it, with every rank's RNG state (the weights and optimizer state
        are the same on every rank after a step)."""
        rng_states = self.dist.gather(rng_state())
        path = checkpoint_dir(self.output_dir, step)
        # Sharded (FSDP2) state is gathered whole by every rank together; rank 0 writes it.
        sharded = self.dist.sharded
        optimizer_state = self.optimizer.state_dict() if sharded or self.dist.is_main else None
        model_state = hf_state_dict(self.model) if sharded else None
        if self.dist.is_main:
            save_checkpoint(self.output_dir, step, model=self.model, tokenizer=self.tokenizer,
                            optimizer_state=optimizer_state,
                            trainer_state={**trainer_state, "world_size": self.dist.world_size},
                            config_yaml=dump_yaml(self.config), base_model_name_or_path=self.base_model_name,
                            save_total_limit=self.config.save_total_limit, rng_states=rng_states,
                            model_state=model_state)
        return path

    def save_checkpoint_if_due(self, step: int, trainer_state: Callable[[], dict[str, Any]],
                               since: int | None = None) -> None:
        """After the optimizer steps (since, step] (default: step alone): a checkpoint if one
        of them is a multiple of save_steps."""
        every, since = self.config.save_steps, step - 1 if since is None else since
        if every and step // every > since // every:
            self.save_checkpoint(step, trainer_state())

    def save_model(self) -> Path:
        """Rank 0 saves the result; every rank returns its path once it is there."""
        path = None
        model_state = hf_state_dict(self.model) if self.dist.sharded else None  # every rank gathers
        if self.dist.is_main:
            path = save_trained_model(self.model, self.tokenizer, self.output_dir, self.base_model_name, model_state)
        return self.dist.broadcast(path)

    def resume(self, restore: Callable[[dict[str, Any], Path], None]) -> bool:
        """Load the checkpoint resume_from_checkpoint names into the model and optimizer and
        hand its trainer_state and path to `restore`; False for a fresh run."""
        checkpoint = resume_from(self.config.resume_from_checkpoint, self.output_dir, self.model, self.optimizer,
                                 settings_must_match(self.config, self.must_match), rank=self.dist.rank)
        if checkpoint is None:
            return False
        advance_weights_epoch(self.model)
        changed = setting_differences(checkpoint.config_yaml, self.config)
        if changed:
            self.log(f"resuming {checkpoint.path} with changed settings, which apply from here on: {'; '.join(changed)}")
        restore(checkpoint.trainer_state, checkpoint.path)
        return True


def _quiet(text: str) -> None:
    """The log of every rank but 0."""


def check_output_dir(config: TrainingConfig) -> None:
    """What the run will check again once it holds output_dir (another run in it, an
    earlier run's checkpoints or results), checked before the model loads."""
    path = Path(config.output_dir)
    if (path / LOCK_NAME).is_file():
        _lock_directory(path).close()  # refused at once if a run holds it
    earlier_run(config)


def earlier_run(config: TrainingConfig) -> list[Path]:
    """The checkpoints and results of an earlier run in config.output_dir that a fresh run
    replaces, when overwrite_output_dir allows it; a ThriftyError when it does not."""
    path = Path(config.output_dir)
    if not path.is_dir() or config.resume_from_checkpoint:
        return []
    checkpoints = list_checkpoints(path)
    results = [path / name for name in RUN_RESULTS if (path / name).exists()]
    if config.overwrite_output_dir or not (checkpoints or results):
        return checkpoints + results
    if checkpoints:
        names = [c.name for c in checkpoints]
        raise ThriftyError(
            f"output_dir {path} holds another run's checkpoints ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}). Continue that run with resume_from_checkpoint: latest, "
            "choose another output_dir, or set overwrite_output_dir: true to delete them and start afresh.")
    raise ThriftyError(
        f"output_dir {path} holds a finished run's results ({', '.join(r.name for r in results)}), which a new run "
        "would replace. Choose another output_dir, or set overwrite_output_dir: true to replace them.")


def _make_output_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:
        raise ThriftyError(f"output_dir {path} is a file, not a directory; choose another output_dir.") from error
    except OSError as error:
        raise ThriftyError(f"output_dir {path} cannot be created ({error.strerror}); choose a writable "
                           "output_dir.") from error
    if not os.access(path, os.W_OK):
        raise ThriftyError(f"output_dir {path} is not writable (read-only file system or permissions); choose "
                           "a writable output_dir.")
    return path


def _lock_directory(path: Path) -> TextIO:
    """An exclusive flock on path/LOCK_NAME, held while the returned file is open. The
    kernel drops it when the holder exits in any way (kill -9 included), so a lock left by
    a killed run is never stale; the holder's pid inside is only for the message."""
    lock_file = open(path / LOCK_NAME, "a+", encoding="utf-8")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "another process"
        lock_file.close()
        raise ThriftyError(f"output_dir {path} is in use by another training run ({holder}); wait for it to "
                           "finish, or choose another output_dir.") from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"pid {os.getpid()}")
    lock_file.flush()
    return lock_file


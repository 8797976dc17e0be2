"""TrainingRun: what an SFT and a GRPO run do around their loops, written once.

The model prepared as the config says (full, LoRA or QLoRA, seeded first so adapters
start the same in every run), its optimizer, the output directory held by one run at a
time, checkpoints saved and resumed, activation checkpointing switched on for the loop,
and optimizer steps that refuse to apply NaN or infinite gradients; under torchrun, the
process group (`dist`), with rank 0 alone printing and writing. The trainers own their
loops and their own state; this object owns the rest.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from torch import nn

from thrifty.config_io import dump_yaml
from thrifty.errors import ThriftyError
from thrifty.formats.atomic import remove_stale_temporaries
from thrifty.formats.default_model import DEFAULT_MODEL_NAME
from thrifty.formats.hf_export import hf_state_dict
from thrifty.layers.quant import quantize_model
from thrifty.model.activation_checkpointing import disable_activation_checkpointing, enable_activation_checkpointing
from thrifty.training.checkpoint import (
    checkpoint_dir, find_latest_checkpoint, list_checkpoints, resume_from, rng_state, save_checkpoint,
    save_trained_model,
    setting_differences, settings_must_match,
)
from thrifty.training.config import TrainingConfig
from thrifty.training.distributed import Distributed
from thrifty.training.optim import MasterWeightAdamW, NonFiniteGradients
from thrifty.training.setup import method_name, prepare_model, set_seed

LOCK_NAME = ".thrifty-run.lock"


class TrainingRun:
    def __init__(self, model: nn.Module, tokenizer: Any, config: TrainingConfig, must_match: Sequence[str],
                 log: Callable[[str], None]) -> None:
        self.config = config
        self.dist = Distributed.from_env()
        self.log = log if self.dist.is_main else _quiet
        log = self.log
        self.tokenizer = tokenizer
        self.must_match = tuple(must_match)
        for notice in config.notices():
            log(notice)
        set_seed(config.seed)  # before LoRA init, so adapters start the same in every run
        if config.adapter is not None:
            if config.quantize is not None:  # QLoRA: the adapter wraps the quantized layers
                quantize_model(model, config.quantize)
            start_from_adapter(model, config.adapter, self.base_model_name, log)
        self.model = prepare_model(model, config)
        if getattr(config, "fsdp", ""):
            if self.dist.enabled:
                self.dist.shard_model(self.model)
            else:
                log("fsdp: one process, nothing to shard (launch with torchrun --nproc-per-node N)")
        self.optimizer = MasterWeightAdamW(self.model.named_parameters(), lr=config.learning_rate,
                                           betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                                           weight_decay=config.weight_decay)
        self.output_dir = Path(config.output_dir)

    @property
    def tensorboard_dir(self) -> Path | None:
        """Where TensorBoard event files go, if report_to asks for them."""
        return self.output_dir / "runs" if "tensorboard" in self.config.report_targets else None

    @property
    def base_model_name(self) -> str:
        return self.config.model_name_or_path or DEFAULT_MODEL_NAME

    @property
    def method(self) -> str:
        """LoRA, QLoRA (nf4) or full fine-tuning, for logs and plot titles."""
        return method_name(self.model, self.config.quantize)

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
        old = [path.name for path in list_checkpoints(self.output_dir)]
        if not old:
            return
        if not self.config.overwrite_output_dir:
            raise ThriftyError(
                f"output_dir {self.output_dir} holds another run's checkpoints ({', '.join(old[:3])}"
                f"{', ...' if len(old) > 3 else ''}). Continue that run with resume_from_checkpoint: latest, "
                "choose another output_dir, or set overwrite_output_dir: true to delete them and start afresh.")
        for name in old:
            shutil.rmtree(self.output_dir / name)

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

    def forward(self, fn: Callable[..., Any], *args: Any, sync: bool = True) -> Any:
        """fn(model, *args) for a loss to backpropagate: under torchrun through DDP, which
        averages the gradients over the ranks in the backward when `sync` (pass False for
        every micro-batch of an optimizer step but the last)."""
        return self.dist.ddp_forward(self.model, fn, *args, sync=sync)

    def optimizer_step(self, step: int) -> float:
        """Clip and apply the accumulated gradients of optimizer step `step` (1-based);
        returns the gradient norm. Stops the run, updating nothing, when the gradients are
        NaN or infinite: training on from there only spreads them into every weight."""
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
        return grad_norm

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
        changed = setting_differences(checkpoint.config_yaml, self.config)
        if changed:
            self.log(f"resuming {checkpoint.path} with changed settings, which apply from here on: {'; '.join(changed)}")
        restore(checkpoint.trainer_state, checkpoint.path)
        return True


def _quiet(text: str) -> None:
    """The log of every rank but 0."""


def start_from_adapter(model: nn.Module, adapter: str, base_model_name: str, log: Callable[[str], None]) -> None:
    """Load `adapter` onto `model` to train it further, after checking it was trained on
    this base model (the same name, or names of the same files)."""
    from thrifty.formats.default_model import resolve_model_path
    from thrifty.formats.peft_adapter import load_adapter, read_adapter_config

    directory = Path(adapter)
    if not (directory / "adapter_config.json").is_file():
        raise ThriftyError(f"adapter = {adapter}: no adapter_config.json there; give a LoRA adapter directory "
                           "(e.g. out/sft/adapter).")
    trained_on = read_adapter_config(directory)[1].get("base_model_name_or_path") or base_model_name

    def same_model(a: str, b: str) -> bool:
        try:
            return a == b or resolve_model_path(a).resolve() == resolve_model_path(b).resolve()
        except ThriftyError:
            return False

    if not same_model(trained_on, base_model_name):
        raise ThriftyError(f"adapter = {adapter} was trained on {trained_on}, but this run's model is "
                           f"{base_model_name}; set model_name_or_path: {trained_on}.")
    load_adapter(model, directory)
    log(f"continuing from the adapter {adapter} (its rank and targets; the lora_* settings are unused)")


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


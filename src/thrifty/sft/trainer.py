"""Supervised fine-tuning: full, LoRA and QLoRA, with one readable loop.

    model, tokenizer = load_model()
    config = SFTConfig(train_file="examples/data/answer_style.jsonl", eval_split=0.1, max_steps=60)
    SFTTrainer(model, tokenizer, config).train()

Each optimizer step takes `gradient_accumulation_steps` micro-batches of
`per_device_train_batch_size` examples (or packed sequences), runs the chunked loss on
the final hidden states (the [tokens x vocab] logits are never built), and divides
every micro-batch's summed loss by the labelled-token count of the whole step: the
result, and the gradient, are exactly those of one big batch. Then: clip, AdamW,
learning-rate schedule, logging, evaluation, checkpoint.

Under torchrun (thrifty.training.distributed) an optimizer step takes
per_device_train_batch_size x gradient_accumulation_steps x world_size items from the
one global order; each micro-batch of per_device_train_batch_size x world_size is split
among the ranks, the labelled-token count is summed over all of them, and DDP averages
the gradients once per step: N processes compute what one process computes with
N times the batch.

What a run leaves in output_dir: metrics.jsonl, loss.png, checkpoint-{step}/ (see
thrifty.training.checkpoint), samples.json (generations before/after) and the result:
adapter/ (PEFT format) for LoRA, model/ (a Hugging Face directory) for full training.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from thrifty.errors import ThriftyError
from thrifty.generation.engine import generate
from thrifty.layers.lora import trainable_parameters
from thrifty.layers.quant import weight_memory_bytes
from thrifty.model.decoder import CausalLM
from thrifty.model.tokenizer import Tokenizer
from thrifty.sft.config import RESUME_MUST_MATCH, SFTConfig
from thrifty.sft.data import Batch, DatasetLike, SFTData, load_sft_data
from thrifty.training.losses import chunked_cross_entropy, output_head
from thrifty.training.distributed import split_evenly
from thrifty.training.metrics import MetricsLog, ProgressBar, peak_rss_bytes, plot_metrics, rss_bytes
from thrifty.training.rows import DataOrder
from thrifty.training.run import AppliedStep, TrainingRun

# Settings a resumed run must share with the checkpoint, or it would not continue
# the same training (the data order itself is checked separately).


def sft_loss(model: CausalLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, labelled tokens) of one batch; labels come shifted."""
    batch = {name: tensor.to(model.device) for name, tensor in batch.items()}
    hidden = model.hidden_states(batch["input_ids"], batch["positions"], batch.get("mask"))
    return chunked_cross_entropy(hidden, output_head(model), batch["labels"])


def _print_now(text: str) -> None:
    print(text, flush=True)  # interleaves correctly with the progress bar on stderr


@dataclass
class LogWindow:
    """Sums over the optimizer steps since the last log line. Part of the checkpoint,
    so a resumed run logs the same averages. Throughput counts the steps' own time,
    not the evaluations and checkpoint saves in between."""

    loss_sum: float = 0.0
    labels: int = 0
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0

    def add(self, loss_sum: float, labels: int, tokens: int, seconds: float) -> None:
        self.loss_sum += loss_sum
        self.labels += labels
        self.tokens += tokens
        self.steps += 1
        self.seconds += seconds

    def flush(self) -> dict[str, float]:
        out = {"loss": self.loss_sum / max(self.labels, 1),
               "tokens_per_sec": round(self.tokens / max(self.seconds, 1e-9), 1)}
        self.loss_sum, self.labels, self.tokens, self.steps, self.seconds = 0.0, 0, 0, 0, 0.0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "labels": self.labels, "tokens": self.tokens, "steps": self.steps,
                "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum, self.labels = float(state["loss_sum"]), int(state["labels"])
        self.tokens, self.steps, self.seconds = int(state["tokens"]), int(state["steps"]), float(state["seconds"])


@dataclass
class TrainResult:
    global_step: int
    train_loss: float | None  # of the last logging window
    eval_loss: float | None  # at the end
    initial_eval_loss: float | None  # before training (eval_on_start), if computed
    tokens_per_sec: float  # real (non-padding) tokens per second of training, this process
    peak_rss_mb: float
    output_path: Path | None  # adapter/ or model/
    samples_before: list[str]
    samples_after: list[str]


class SFTTrainer:
    """Supervised fine-tuning of `model` on `train_dataset` (or config.train_file).

    train_dataset / eval_dataset: a file path, a list of row dicts (text, prompt +
    completion, chat messages or Alpaca), or pre-tokenized TokenizedExamples.
    The model is prepared as the config says (quantized and/or given LoRA adapters, in
    place) unless it already has LoRA layers, which are then trained as they are.
    `log` receives the human-readable report lines (default: print).
    """

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, config: SFTConfig | None = None,
                 train_dataset: DatasetLike | None = None, eval_dataset: DatasetLike | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.config = config or SFTConfig()
        self.tokenizer = tokenizer
        self.log = log or _print_now
        self.run = TrainingRun(model, tokenizer, self.config, RESUME_MUST_MATCH, self.log)
        self.log, self.dist, self.config = self.run.log, self.run.dist, self.run.config
        self.model, self.optimizer, self.output_dir = self.run.model, self.run.optimizer, self.run.output_dir
        self.data: SFTData = load_sft_data(self.config, tokenizer, train_dataset, eval_dataset,
                                           model.config.sliding_window)
        cfg = self.config
        self.order = DataOrder(len(self.data.train_items), cfg.per_device_train_batch_size *
                               cfg.gradient_accumulation_steps * self.dist.world_size, seed=cfg.seed)
        self.total_steps = self._total_steps()
        if self.config.max_steps == 0:
            self.log(f"max_steps = 0 sets no step limit (as in transformers): {self.config.num_train_epochs:g} "
                     f"epochs of num_train_epochs, {self.total_steps} steps.")
        self.schedule = self.run.set_total_steps(self.total_steps)
        self.step = 0
        self.window = LogWindow()
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl", self.run.tensorboard_dir, self.dist.is_main)

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        """Run to the end (or resume, as the config says) and save the result."""
        with self.run.holding_output_dir():
            cfg, model = self.config, self.model
            resumed = self.run.resume(self._restore)
            self.log(self._describe_run())
            before: list[str] = []
            initial_eval = None
            if not resumed:
                self.metrics.start_fresh()
                before = self._sample("before training")
                if cfg.eval_on_start and self.data.eval_examples:
                    initial_eval = self.evaluate()
                    self.metrics.write({"step": 0, "epoch": 0.0, "eval_loss": initial_eval})
                    self.log(f"eval loss before training: {initial_eval:.4f}")
            model.train()
            last_loss = eval_loss = None
            train_tokens, train_seconds = 0, 0.0
            with self.run.checkpointed_layers(), ProgressBar(self.total_steps, self.step, cfg.disable_tqdm, desc="sft", shown=self.dist.is_main) as progress:
                while self.step < self.total_steps:
                    started = time.perf_counter()
                    batches = self.micro_batches(self.order.next_batch())
                    loss_sum, applied = self.training_step(batches)
                    self.step += 1
                    loss_sum, labels, tokens = self.dist.sum(  # all ranks' (the same numbers in a world of one)
                        [loss_sum, sum(b.num_labels for b in batches if b), sum(b.num_tokens for b in batches if b)])
                    labels, tokens = int(labels), int(tokens)
                    seconds = time.perf_counter() - started
                    train_tokens, train_seconds = train_tokens + tokens, train_seconds + seconds
                    progress.update(loss_sum / max(labels, 1), tokens / seconds, applied.lr)
                    self.window.add(loss_sum, labels, tokens, seconds)

                    record = self._log_and_evaluate(applied.lr, applied.grad_norm)
                    last_loss = record.get("loss", last_loss)
                    eval_loss = record.get("eval_loss", eval_loss)
                    if "eval_loss" in record:
                        progress.write(f"step {self.step}: eval loss {record['eval_loss']:.4f}")
                    self.run.save_checkpoint_if_due(self.step, self._trainer_state)
            model.eval()
            if self.dist.is_main:
                plot_metrics(self.metrics.read(), self.output_dir / "loss.png", ["loss", "eval_loss"],
                             title=f"SFT: {self.run.method.name}", ylabel="cross-entropy (nats/token)")
            output = self.run.save_model()
            after = self._sample("after training")
            self._save_samples(before, after)
            result = TrainResult(
                global_step=self.step, train_loss=last_loss, eval_loss=eval_loss, initial_eval_loss=initial_eval,
                tokens_per_sec=train_tokens / train_seconds if train_seconds else 0.0,
                peak_rss_mb=peak_rss_bytes() / 2**20, output_path=output, samples_before=before, samples_after=after)
            self.log(self._summary(result))
            return result

    def _log_and_evaluate(self, lr: float, grad_norm: float) -> dict[str, Any]:
        """After a step: the metrics.jsonl record due now (train stats every logging_steps,
        eval loss every eval_steps, both at the last step); empty if nothing is due."""
        cfg, last = self.config, self.step == self.total_steps
        record: dict[str, Any] = {}
        if self.step % cfg.logging_steps == 0 or last:
            record.update(self.window.flush())
            record.update(lr=lr, grad_norm=grad_norm, rss_mb=round(rss_bytes() / 2**20, 1))
        if self.data.eval_examples and ((cfg.eval_steps and self.step % cfg.eval_steps == 0) or last):
            record["eval_loss"] = self.evaluate()
        if record:
            self.metrics.write({"step": self.step, "epoch": round(self.epoch, 4), **record})
        return record

    def micro_batches(self, items: list[int]) -> list[Batch | None]:
        """This rank's micro-batches of an optimizer step's items: the items split into
        gradient_accumulation_steps micro-batches, each split among the ranks. None where
        this rank's share is empty (the last, short step of an epoch)."""
        chunks = [chunk for chunk in split_evenly(items, self.config.gradient_accumulation_steps) if chunk]
        return [self.data.train_batch(mine) if (mine := self.dist.shard(chunk)) else None for chunk in chunks]

    def training_step(self, batches: list[Batch | None]) -> tuple[float, AppliedStep]:
        """One optimizer step over the micro-batches; returns (this rank's summed loss, the step)."""
        loss_sum = self.accumulate_gradients(batches)
        return loss_sum, self.run.optimizer_step(self.step + 1)

    def accumulate_gradients(self, batches: list[Batch | None]) -> float:
        """Forward and backward over the micro-batches of one step; returns this rank's
        summed loss.

        Dividing each micro-batch's loss *sum* by the token count of the whole step, all
        ranks together (not by its own count), weights every token equally, however the
        tokens fall into micro-batches and ranks: the same loss and gradient as one batch of
        them all. DDP averages the ranks' gradients, hence the factor world_size.
        """
        world = self.dist.world_size
        total_labels = max(self.dist.sum([sum(b.num_labels for b in batches if b)])[0], 1)
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            # A rank with no share of a micro-batch still takes part in DDP's reduction,
            # with zero weight on some real batch (all the ranks must run each backward).
            tensors = batch.tensors if batch else self._any_batch().tensors
            loss, _ = self.run.forward(sft_loss, tensors, sync=i == len(batches) - 1)
            (loss * (world / total_labels if batch else 0.0)).backward()
            loss_sum += loss.item() if batch else 0.0
        return loss_sum

    def _any_batch(self) -> Batch:
        return self.data.train_batch([0])

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean loss over the eval examples (dropout off)."""
        was_training = self.model.training
        self.model.eval()
        loss_sum, labels = 0.0, 0
        batches = list(self.data.eval_batches(self.config.per_device_eval_batch_size))
        world = self.dist.world_size
        # Under torchrun each rank takes every N-th batch; sharded (FSDP2), every rank must
        # run as many forwards as the others, so the short ones repeat a batch unweighted.
        end = -(-len(batches) // world) * world if self.dist.sharded else len(batches)
        for i in range(self.dist.rank, end, world):
            loss, count = sft_loss(self.model, batches[min(i, len(batches) - 1)].tensors)
            if i < len(batches):
                loss_sum, labels = loss_sum + loss.item(), labels + int(count)
        self.model.train(was_training)
        loss_sum, labels = self.dist.sum([loss_sum, labels])
        return loss_sum / max(labels, 1)

    @property
    def epoch(self) -> float:
        return self.order.epoch + self.order.position / self.order.num_items

    def _total_steps(self) -> int:
        cfg = self.config
        if cfg.max_steps > 0:
            return cfg.max_steps
        return max(1, math.ceil(cfg.num_train_epochs * self.order.batches_per_epoch))

    # ------------------------------------------------------------------ saving

    def _trainer_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of this trainer, for an exact resume."""
        return {"step": self.step, "epoch": self.epoch, "total_steps": self.total_steps,
                "data_order": self.order.state_dict(), "log_window": self.window.state_dict(),
                "schedule": {"type": self.schedule.kind, "warmup_steps": self.schedule.warmup_steps}}

    # ------------------------------------------------------------------ resuming

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        """This trainer's part of resuming from the checkpoint at `path`."""
        cfg, saved = self.config, state["data_order"]["batch_size"]
        if saved != self.order.batch_size:
            raise ThriftyError(
                f"{path} was trained with {saved} examples per optimizer step; this run takes "
                f"{self.order.batch_size} (per_device_train_batch_size {cfg.per_device_train_batch_size} x "
                f"gradient_accumulation_steps {cfg.gradient_accumulation_steps} x {self.dist.world_size} processes). "
                "Keep the product the same to resume: e.g. with half the processes, double "
                "gradient_accumulation_steps.")
        self.order.load_state_dict(state["data_order"])
        self.window.load_state_dict(state["log_window"])
        self.step = int(state["step"])
        if self.step > self.total_steps:
            raise ThriftyError(f"{path} is at step {self.step}, past this run's {self.total_steps} steps; raise "
                               "max_steps or num_train_epochs to train further.")
        self.metrics.keep_until(self.step)
        self.log(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ reporting

    def _describe_run(self) -> str:
        cfg = self.config
        items = "packed sequences" if self.data.packed else "examples"
        return (f"SFT ({self.run.method.name}) of {self.run.base_model_name} [{str(self.model.dtype).removeprefix('torch.')}, base weights "
                f"{weight_memory_bytes(self.model) / 2**20:.0f} MB]: {trainable_parameters(self.model)}\n"
                f"  {len(self.data.train_items)} train {items}, {len(self.data.eval_examples)} eval examples; "
                f"{self.total_steps} steps of {cfg.per_device_train_batch_size} x "
                f"{cfg.gradient_accumulation_steps} (batch x accumulation)"
                + (f" x {self.dist.world_size} processes" if self.dist.enabled else "") + f", lr {cfg.learning_rate:g} "
                f"{cfg.lr_scheduler_type}; output in {self.output_dir}")

    def _sample(self, when: str) -> list[str]:
        """Greedy generations on the held-out prompts, printed (by rank 0 alone)."""
        prompts = self.data.held_out_prompts
        # Under FSDP2 every forward is a collective of all ranks: no rank-0-only generation.
        if not prompts or self.tokenizer is None or not self.dist.is_main or self.dist.sharded:
            return []
        was_training = self.model.training
        self.model.eval()
        chat = self.tokenizer.chat_template is not None
        completions = generate(self.model, self.tokenizer, prompts, max_new_tokens=self.config.sample_max_new_tokens,
                               temperature=0.0, seed=self.config.seed, chat=chat)
        self.model.train(was_training)
        texts = [c.text for c in completions]
        lines = [f"--- samples {when} ---"]
        for prompt, text in zip(prompts, texts):
            shown = prompt if isinstance(prompt, str) else prompt[-1].get("content", "")
            lines += [f"> {shown}", f"  {text.strip()}"]
        self.log("\n".join(lines))
        return texts

    def _save_samples(self, before: list[str], after: list[str]) -> None:
        if not after:
            return
        rows = [{"prompt": p, "before": b, "after": a}
                for p, b, a in zip(self.data.held_out_prompts, before or [None] * len(after), after)]
        (self.output_dir / "samples.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")

    def _summary(self, result: TrainResult) -> str:
        parts = [f"done: {result.global_step} steps, {result.tokens_per_sec:.0f} tokens/s, "
                 f"peak RSS {result.peak_rss_mb:.0f} MB"]
        if result.eval_loss is not None:
            start = f"{result.initial_eval_loss:.4f} -> " if result.initial_eval_loss is not None else ""
            parts.append(f"eval loss {start}{result.eval_loss:.4f}")
        if result.output_path is not None:
            parts.append(f"saved {result.output_path}")
        return "; ".join(parts)

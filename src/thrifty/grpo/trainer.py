"""GRPO: reinforcement learning from reward functions, as one loop you can read.

    model, tokenizer = load_model()
    task = get_task("arithmetic")
    GRPOTrainer(model, tokenizer, config=GRPOConfig(task="arithmetic", max_steps=30)).train()

Each generation (see `_generation`; the batch fields count as in TRL, see grpo/config.py):
  1. rollout: take generation_batch_size / num_generations prompts, sample
     num_generations completions of each with the generation engine (live LoRA
     weights, no merge);
  2. score: call every reward function (TRL's signature), weight and sum the rewards;
  3. advantages: each completion's reward minus its group's mean (scaled by the std);
     with dynamic_sampling, groups whose rewards are all equal are dropped and refilled
     by sampling more prompts;
  4. update: the completions, in order, make steps_per_generation micro-batches of
     per_device_train_batch_size that hold each prompt once, followed by its
     completions (grpo/batches.py); every gradient_accumulation_steps of them make one
     optimizer step of the clipped-surrogate loss (grpo_loss), num_iterations times
     over. The log-probs come from the final hidden states through selective_log_probs,
     so the [tokens x vocab] logits never exist; old log-probs are computed only when a
     generation feeds more than one optimizer step, reference log-probs (adapters off,
     or a frozen copy for full fine-tuning) only when beta > 0.

Each completion is sampled from its own random stream, seeded by (seed, generation, draw,
prompt position, sample): a resumed run samples the same completions as an uninterrupted
one (exact resume needs only the weights, optimizer, data order and RNG state in the
checkpoint, saved between generations), and so does any number of processes.

Under torchrun (thrifty.training.distributed) each rank rolls out and scores a contiguous
share of a generation's prompts (whole groups), the scored groups are gathered so every
rank holds the whole generation (advantages, dynamic sampling and the logged metrics see
all of it), and each micro-batch of per_device_train_batch_size x world_size completions
is split among the ranks, normalised over the whole micro-batch, its gradients averaged
by DDP: N processes compute what one process computes with the same global batch.

What a run leaves in output_dir: metrics.jsonl, completions.jsonl (a few completions per
step with their rewards), rewards.png, checkpoint-{step}/, and adapter/ (PEFT format)
or model/ (full fine-tuning).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from thrifty.errors import ThriftyError
from thrifty.generation.engine import generate_tokens, render_prompt
from thrifty.generation.sampling import SamplingParams
from thrifty.grpo.batches import MicroBatch, RankSlice, completion_log_probs, pack_groups
from thrifty.grpo.config import RESUME_MUST_MATCH, GRPOConfig
from thrifty.grpo.evaluation import EvalResult, evaluate_rows, merge_eval_results
from thrifty.grpo.loss import (
    collect_informative_groups,
    combine_rewards,
    completion_mask,
    group_advantages,
    grpo_loss,
    reward_metrics,
    rollout_importance_ratio,
)
from thrifty.grpo.reporting import (
    GRPOResult,
    average_micro_batch_metrics,
    average_records,
    before_and_after,
    describe_run,
    nan_to_none,
    postfix,
    summary,
)
from thrifty.grpo.rewards import RewardFunc, call_reward_function, reward_function_list, reward_function_name
from thrifty.grpo.tasks import Task, get_task
from thrifty.layers.lora import disable_lora
from thrifty.model.decoder import CausalLM
from thrifty.model.inference_plan import InferencePlan
from thrifty.model.tokenizer import Tokenizer
from thrifty.training.metrics import (
    MetricsLog,
    ProgressBar,
    peak_rss_bytes,
    plot_metrics,
    rss_bytes,
)
from thrifty.training.rows import DataOrder, load_rows, without_blank_prompts
from thrifty.training.run import TrainingRun
from thrifty.layers.lora import has_lora

# Wall-clock measurements in metrics.jsonl: not reproducible between runs.
TIMING_KEYS = ("time/generation", "time/scoring", "time/training", "time/step", "rss_mb")


def _print_now(text: str) -> None:
    print(text, flush=True)


@dataclass
class Group:
    """One prompt and its num_generations sampled completions, scored."""

    row: dict[str, Any]
    prompt_ids: list[int]
    completion_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]
    rewards: torch.Tensor  # [num_reward_funcs, G], NaN where a function returned None
    correct: list[bool] | None  # the task's checker, when there is a task
    sampling_log_probs: list[list[float]] | None = None  # per token, under rollout_quantization's weights


class GRPOTrainer:
    """GRPO fine-tuning of `model` with `reward_funcs` on the prompts of `train_dataset`.

    train_dataset: rows (dicts) with a `prompt` (a string, or chat messages) and any other
    columns, which reach the reward functions as keyword arguments (one value per
    completion), as in TRL. None: config.train_file, or the rows of config.task.
    reward_funcs: None with a task means the task's reward functions (and weights).
    eval_dataset: held-out rows for accuracy (needs a task's checker); None with a task:
    the first config.num_eval_samples of its eval split.
    """

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, reward_funcs: Sequence[RewardFunc] | None = None,
                 train_dataset: Sequence[dict[str, Any]] | str | None = None, config: GRPOConfig | None = None,
                 eval_dataset: Sequence[dict[str, Any]] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.config = cfg = config or GRPOConfig()
        self.tokenizer = tokenizer
        self.log = log or _print_now
        self.task: Task | None = get_task(cfg.task, **cfg.task_settings) if cfg.task else None
        self.rows = self._train_rows(train_dataset)
        self.reward_funcs = reward_function_list(reward_funcs) if reward_funcs is not None else (
            self.task.reward_funcs() if self.task is not None else [])
        if not self.reward_funcs:
            raise ThriftyError("GRPOTrainer needs reward functions: pass reward_funcs=[...] or set a built-in "
                               "`task` in the config (it brings its own).")
        self.reward_names = [reward_function_name(f) for f in self.reward_funcs]
        self.reward_weights = cfg.reward_weights
        if self.reward_weights is None and reward_funcs is None and self.task is not None:
            self.reward_weights = self.task.reward_weights()
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ThriftyError(f"reward_weights has {len(self.reward_weights)} entries for "
                               f"{len(self.reward_funcs)} reward functions ({', '.join(self.reward_names)}); "
                               "give one weight per function, in order.")
        self.eval_rows: list[dict[str, Any]] = list(eval_dataset) if eval_dataset is not None else (
            self.task.rows("eval", cfg.num_eval_samples, seed=0)
            if self.task is not None and cfg.num_eval_samples > 0 else [])
        self.chat = tokenizer.chat_template is not None
        self.run = TrainingRun(model, tokenizer, cfg, RESUME_MUST_MATCH, self.log)
        self.log, self.dist, self.config = self.run.log, self.run.dist, self.run.config
        cfg = self.config
        self.model, self.optimizer, self.output_dir = self.run.model, self.run.optimizer, self.run.output_dir
        # The KL reference: with LoRA the same model with adapters off (no copy); for full
        # fine-tuning a frozen copy of the starting weights.
        self.ref_model: CausalLM | None = None
        if cfg.beta > 0 and not has_lora(self.model):
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.order = DataOrder(len(self.rows), cfg.prompts_per_generation, seed=cfg.seed)
        self.total_steps = self._total_steps()
        self.run.set_total_steps(self.total_steps)
        self.sampling = SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl", self.run.tensorboard_dir, self.dist.is_main)
        self.completions_log = MetricsLog(self.output_dir / "completions.jsonl", writes=self.dist.is_main)
        self.step = 0  # optimizer steps, as TRL's global_step
        self.generations = 0
        self.seconds = {"generation": 0.0, "scoring": 0.0, "training": 0.0}
        self._prompt_cache: dict[int, list[int]] = {}
        self._last_eval: EvalResult | None = None
        self._unlogged: list[dict[str, Any]] = []  # step records since the last metrics.jsonl line

    # ------------------------------------------------------------------ data

    def _train_rows(self, source: Sequence[dict[str, Any]] | str | None) -> list[dict[str, Any]]:
        cfg = self.config
        if source is None and cfg.train_file is not None:
            source = cfg.train_file
        if source is None:
            if self.task is None:
                raise ThriftyError("no training prompts: pass train_dataset=rows, or set train_file or a built-in "
                                   "`task` (e.g. task: arithmetic) in the config.")
            return self.task.rows("train", cfg.num_train_prompts, seed=cfg.seed)
        rows = load_rows(source) if isinstance(source, (str, Path)) else list(source)
        where = f"{source}" if isinstance(source, (str, Path)) else "train_dataset"
        if not rows:
            raise ThriftyError(f"{where}: no rows; GRPO needs prompts to train on.")
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or "prompt" not in row:
                raise ThriftyError(f"{where} row {i + 1}: needs a `prompt` column (a string or chat messages); "
                                   f"got {sorted(row) if isinstance(row, dict) else type(row).__name__}.")
        return without_blank_prompts(rows, where)

    def _prompt_ids(self, index: int) -> list[int]:
        if index not in self._prompt_cache:
            prompt = self.rows[index]["prompt"]
            if not self.chat and not isinstance(prompt, str):
                raise ThriftyError(f"train row {index + 1}: chat-message prompts need a tokenizer with a chat "
                                   "template; this one has none. Use plain-text prompts.")
            self._prompt_cache[index] = render_prompt(self.tokenizer, prompt, self.chat, self.config.system_prompt,
                                                      self.config.max_prompt_length)
        return self._prompt_cache[index]

    # ------------------------------------------------------------------ rollout and scoring

    def _total_steps(self) -> int:
        cfg = self.config
        if cfg.max_steps > 0:
            return cfg.max_steps
        generations_per_epoch = math.ceil(len(self.rows) / cfg.prompts_per_generation)
        return max(math.ceil(cfg.num_train_epochs * generations_per_epoch) * cfg.updates_per_generation, 1)

    def _sample_seed(self, draw: int, position: int, sample: int) -> int:
        # A pure function of the run's seed and where the completion is in the run, not of
        # which process samples it or with which others.
        key = [self.config.seed, self.generations, draw, position, sample]
        return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)

    def rollout(self, indices: list[int], draw: int = 0) -> list[Group]:
        """Sample num_generations completions for each prompt and score them: under
        torchrun this rank's share of the prompts, then every rank's groups gathered."""
        mine = self.dist.shard(list(enumerate(indices)))
        groups = self._rollout_here([i for _, i in mine], [p for p, _ in mine], draw) if mine else []
        return [group for part in self.dist.gather(groups) for group in part]

    def _rollout_here(self, indices: list[int], positions: list[int], draw: int) -> list[Group]:
        cfg, G = self.config, self.config.num_generations
        rows = [self.rows[i] for i in indices]
        prompt_ids = [self._prompt_ids(i) for i in indices]
        started = time.perf_counter()
        self.model.eval()  # no dropout while sampling; generate_tokens runs under inference_mode
        sampled = [] if cfg.rollout_quantization else None
        tokens, reasons = generate_tokens(self.model, prompt_ids, max_new_tokens=cfg.max_completion_length,
                                          sampling=self.sampling, num_return_sequences=G,
                                          row_seeds=[self._sample_seed(draw, p, j) for p in positions for j in range(G)],
                                          stop_token_ids=self.tokenizer.stop_token_ids,
                                          pad_token_id=self.tokenizer.pad_token_id,
                                          min_new_tokens=cfg.min_completion_length, plan=self.inference_plan(),
                                          sampled_log_probs=sampled)
        self.model.train()
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        scored = time.perf_counter()
        self.seconds["generation"] += scored - started
        per_function = self.score(rows, texts, tokens)
        correct = None
        if self.task is not None:
            correct = [self.task.check(text, rows[i // G]) for i, text in enumerate(texts)]
        self.seconds["scoring"] += time.perf_counter() - scored
        return [Group(row=rows[g], prompt_ids=prompt_ids[g], completion_ids=tokens[g * G:(g + 1) * G],
                      texts=texts[g * G:(g + 1) * G], truncated=[r == "length" for r in reasons[g * G:(g + 1) * G]],
                      rewards=per_function[:, g * G:(g + 1) * G],
                      correct=None if correct is None else correct[g * G:(g + 1) * G],
                      sampling_log_probs=None if sampled is None else sampled[g * G:(g + 1) * G])
                for g in range(len(rows))]

    def inference_plan(self) -> InferencePlan:
        """What rollouts and evaluations sample with: the weights, or their quantized copy."""
        return self.run.inference_plan(quantization=self.config.rollout_quantization)

    def score(self, rows: list[dict[str, Any]], texts: list[str], tokens: list[list[int]]) -> torch.Tensor:
        """[num_funcs, N] rewards of the N = len(rows) * G completions (NaN for None).

        As TRL: `prompts` are the dataset's prompts; completions are strings, or for chat
        prompts an assistant message list; every other column is passed by name."""
        G = self.config.num_generations
        prompts = [row["prompt"] for row in rows for _ in range(G)]
        completions: list[Any] = [t if isinstance(p, str) else [{"role": "assistant", "content": t}]
                                  for p, t in zip(prompts, texts)]
        keys = [k for k in rows[0] if k != "prompt"]
        columns = {k: [row.get(k) for row in rows for _ in range(G)] for k in keys}
        out = torch.empty(len(self.reward_funcs), len(texts))
        for f, func in enumerate(self.reward_funcs):
            values = call_reward_function(func, prompts, completions, tokens, columns)
            out[f] = torch.tensor([float("nan") if v is None else v for v in values])
        return out

    def _combined(self, groups: list[Group]) -> torch.Tensor:
        """[groups, G] weighted sums of the reward functions' values."""
        return combine_rewards(_per_function(groups), self.reward_weights)

    def collect_groups(self) -> tuple[list[Group], list[Group], dict[str, float]]:
        """(groups to train on, every group sampled this step, dynamic-sampling stats)."""
        cfg = self.config
        if not cfg.dynamic_sampling:
            groups = self.rollout(self.order.next_batch())
            return groups, groups, {}
        drawn: list[Group] = []

        def candidates() -> Iterator[tuple[list[Group], torch.Tensor]]:
            for draw in range(cfg.max_dynamic_sampling_draws):
                groups = self.rollout(self.order.next_batch(), draw)
                drawn.extend(groups)
                yield groups, self._combined(groups)

        got = collect_informative_groups(candidates(), cfg.prompts_per_generation, cfg.max_dynamic_sampling_draws)
        stats = {"dynamic_sampling/draws": got.num_draws, "dynamic_sampling/discarded_groups": got.num_discarded,
                 "dynamic_sampling/kept_groups": len(got.groups)}
        return got.groups, drawn, stats

    # ------------------------------------------------------------------ log-probs and update

    def micro_batches(self, groups: list[Group], advantages: torch.Tensor) -> list[RankSlice]:
        """The generation's completions (advantages [groups, G]), in order, in
        steps_per_generation micro-batches, each split among the ranks: this rank's slices."""
        cfg = self.config
        advantages = advantages.flatten()  # group-major, as the completions below
        prompts = [g.prompt_ids for g in groups for _ in g.completion_ids]
        completions = [c for g in groups for c in g.completion_ids]
        sampled = [s for g in groups for s in g.sampling_log_probs or [None] * len(g.completion_ids)]
        truncated = torch.tensor([t for g in groups for t in g.truncated])
        lengths = torch.tensor([len(c) for c in completions])
        loss_tokens = completion_mask(lengths, int(lengths.max()), truncated, cfg.mask_truncated_completions).sum(1)
        slices = []
        for chunk in torch.arange(len(completions)).tensor_split(cfg.micro_batches_per_generation):
            if not len(chunk):
                continue
            mine = torch.tensor(self.dist.shard(chunk.tolist()), dtype=torch.long)
            # A rank with no share still takes part in DDP's reduction, with zero weight.
            idx = mine if len(mine) else chunk[:1]
            batch = self._micro_batch([prompts[i] for i in idx], [completions[i] for i in idx], truncated[idx],
                                      advantages[idx], [sampled[i] for i in idx])
            slices.append(RankSlice(batch, float(len(mine) > 0), len(chunk), float(loss_tokens[chunk].sum())))
        return slices

    def _micro_batch(self, prompts: list[list[int]], completions: list[list[int]], truncated: torch.Tensor,
                     advantages: torch.Tensor, sampled: list[list[float] | None]) -> MicroBatch:
        lengths = torch.tensor([len(c) for c in completions])
        mask = completion_mask(lengths, int(lengths.max()), truncated, self.config.mask_truncated_completions)
        batch = pack_groups(prompts, completions, mask, advantages, pad_token_id=self.tokenizer.pad_token_id,
                            sliding_window=self.model.config.sliding_window, device=self.model.device)
        if all(s is not None for s in sampled):
            width = mask.shape[1]
            batch.sampling_log_probs = torch.tensor([s + [0.0] * (width - len(s)) for s in sampled],  # type: ignore
                                                    device=self.model.device)
        return batch

    def log_probs(self, batch: MicroBatch, model: CausalLM | None = None) -> torch.Tensor:
        """[B, T] log-probs of the completion tokens (at the sampling temperature)."""
        model = model or self.model
        return completion_log_probs(model, batch, self.config.temperature)

    @torch.no_grad()
    def reference_log_probs(self, batch: MicroBatch) -> torch.Tensor:
        if self.ref_model is not None:
            return self.log_probs(batch, self.ref_model)
        with disable_lora(self.model):
            return self.log_probs(batch)

    def update(self, slices: list[RankSlice]) -> dict[str, float]:
        """The optimizer steps one generation feeds: every gradient_accumulation_steps
        micro-batches make one, num_iterations times over (stopping at the run's last
        step); their metrics."""
        cfg, world = self.config, self.dist.world_size
        batches = [s.batch for s in slices]
        # Old log-probs matter only when the weights move before a micro-batch's last use
        # (for a single optimizer step they equal the current ones: grpo_loss then uses
        # logp.detach()), or when other weights sampled the completions (TRL's vLLM case).
        correcting = cfg.rollout_quantization is not None and cfg.vllm_importance_sampling_correction
        with torch.no_grad():
            old = ([self.log_probs(b) for b in batches] if cfg.updates_per_generation > 1 or correcting
                   else [None] * len(batches))
        ratios: list[torch.Tensor | None] = [None] * len(batches)
        sampling_metrics: list[dict[str, float]] = [{} for _ in batches]
        if correcting:
            for i, b in enumerate(batches):
                ratios[i], sampling_metrics[i] = rollout_importance_ratio(
                    old[i], b.sampling_log_probs, b.completion_mask, mode=cfg.vllm_importance_sampling_mode,
                    clip_min=cfg.vllm_importance_sampling_clip_min, clip_max=cfg.vllm_importance_sampling_clip_max)
        ref = [self.reference_log_probs(b) for b in batches] if cfg.beta > 0 else [None] * len(batches)
        accumulation = cfg.gradient_accumulation_steps
        windows = [list(range(start, min(start + accumulation, len(batches))))
                   for start in range(0, len(batches), accumulation)]
        # dapo: the loss tokens of the whole generation, per optimizer step (as TRL scales
        # num_items_in_batch by gradient_accumulation_steps / steps_per_generation).
        items = sum(s.tokens for s in slices) / len(windows)
        micro_batch_metrics: list[dict[str, float] | None] = []
        grad_norm, lr = 0.0, cfg.learning_rate
        for window in [w for _ in range(cfg.num_iterations) for w in windows]:
            if self.step >= self.total_steps:
                break
            for i in window:
                logp = self.run.forward(completion_log_probs, batches[i], cfg.temperature, sync=i == window[-1])
                loss, metrics = grpo_loss(
                    logp, old[i], ref[i], batches[i].advantages, batches[i].completion_mask, loss_type=cfg.loss_type,
                    beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                    max_completion_length=cfg.max_completion_length, num_items_in_batch=items,
                    gradient_accumulation_steps=len(window), num_sequences=slices[i].sequences,
                    num_tokens=slices[i].tokens, importance_sampling_ratio=ratios[i])
                metrics.update(sampling_metrics[i])
                # DDP averages the ranks' gradients; each rank's loss is its part of the sum.
                (loss * (world * slices[i].weight)).backward()
                micro_batch_metrics.append(metrics if slices[i].weight else None)
            # Zero advantages everywhere (every group scored alike) teach nothing: a zero
            # gradient there is no collapse. Decided on every rank's batches, so all agree.
            teaches = any(self.dist.gather(any(bool(batches[i].advantages.any()) for i in window)))
            applied = self.run.optimizer_step(self.step + 1, expects_gradients=teaches)
            grad_norm, lr = applied.grad_norm, applied.lr
            self.step += 1
        out = average_micro_batch_metrics(self.dist.gather(micro_batch_metrics))
        out["loss"] = out.pop("policy_loss", 0.0)
        out.update(grad_norm=float(grad_norm), lr=lr)
        return out

    # ------------------------------------------------------------------ the loop

    def train(self) -> GRPOResult:
        """Run to the end (or resume, as the config says) and save the result."""
        with self.run.holding_output_dir():
            cfg, model = self.config, self.model
            resumed = self.run.resume(self._restore)
            self.log(self._describe_run())
            initial_eval = None
            if not resumed:
                self.metrics.start_fresh()
                self.completions_log.start_fresh()
                if cfg.eval_on_start:
                    initial_eval = self.evaluate()
                    if initial_eval is not None:
                        self.metrics.write({"step": 0, "eval_accuracy": initial_eval.accuracy})
                        self.log(f"held-out before training: {initial_eval.summary()}")
            with (self.run.checkpointed_layers(),
                  ProgressBar(self.total_steps, self.step, cfg.disable_tqdm, desc="grpo", shown=self.dist.is_main) as progress):
                while self.step < self.total_steps:
                    before = self.step
                    record = self._generation()
                    progress.advance(postfix(record), self.step - before)
                    if "eval_accuracy" in record:
                        progress.write(f"step {self.step}: held-out accuracy {record['eval_accuracy']:.1%}")
                    self.run.save_checkpoint_if_due(self.step, self._trainer_state, since=before)
            model.eval()
            records = self.dist.broadcast(self.metrics.read())
            if self.dist.is_main:
                plot_metrics(records, self.output_dir / "rewards.png", ["reward", "accuracy", "eval_accuracy"],
                             title=f"GRPO: {self.run.method.name}", ylabel="reward / accuracy")
            output = self.run.save_model()
            final_eval = self._last_eval
            rewards = [r["reward"] for r in records if "reward" in r]
            result = GRPOResult(global_step=self.step, initial_eval=initial_eval, final_eval=final_eval,
                                output_path=output, mean_reward_first=rewards[0] if rewards else None,
                                mean_reward_last=rewards[-1] if rewards else None, seconds=dict(self.seconds),
                                peak_rss_mb=peak_rss_bytes() / 2**20)
            self.log(summary(result))
            if initial_eval is not None and final_eval is not None:
                self.log(before_and_after(initial_eval, final_eval))
            return result

    def _check_reward_signal(self, rewards: torch.Tensor) -> None:
        """Stop when a reward function scored none of a step's completions (None or NaN for
        all): every advantage would then be 0 and the run would "train" on nothing."""
        for name, values in zip(self.reward_names, rewards):
            if torch.isnan(values).all():
                raise ThriftyError(
                    f"step {self.step + 1}: reward function '{name}' gave no usable value (None or NaN) for any "
                    f"of the {values.numel()} completions, so GRPO has no signal to learn from. Make it return a "
                    "number for every completion it can score (None only where it does not apply), or remove it.")

    def _generation(self) -> dict[str, Any]:
        """One generation: rollout, score, advantages, and the optimizer steps it feeds;
        returns the metrics record (its "step": the optimizer steps done after it)."""
        cfg = self.config
        started, first_step = time.perf_counter(), self.step
        before = dict(self.seconds)
        groups, drawn, stats = self.collect_groups()
        drawn_rewards = _per_function(drawn)  # [functions, groups, G]
        self._check_reward_signal(drawn_rewards)
        record: dict[str, Any] = reward_metrics(drawn_rewards, self.reward_names, self.reward_weights)
        record.update(self._completion_stats(drawn))
        record.update(stats)
        train_started = time.perf_counter()
        if groups:
            rewards = self._combined(groups)
            advantages = group_advantages(rewards, cfg.scale_rewards)
            record.update(self.update(self.micro_batches(groups, advantages)))
            self._log_completions(groups, rewards, advantages, first_step + 1)
        else:  # the steps still count, or a run whose groups all tie would never end
            self.step = min(self.step + cfg.updates_per_generation, self.total_steps)
            self.log(f"step {self.step}: every sampled group had equal rewards; no update")
        self.seconds["training"] += time.perf_counter() - train_started
        self.generations += 1
        record = {"step": self.step, **record}
        last = self.step >= self.total_steps
        for key in self.seconds:
            record[f"time/{key}"] = round(self.seconds[key] - before[key], 3)
        record["time/step"] = round(time.perf_counter() - started, 3)
        record["rss_mb"] = round(rss_bytes() / 2**20, 1)
        if _crossed(first_step, self.step, cfg.eval_steps) or last:
            result = self.evaluate()
            if result is not None:
                record["eval_accuracy"] = result.accuracy
        self._unlogged.append(record)
        if _crossed(first_step, self.step, cfg.logging_steps) or last or "eval_accuracy" in record:
            self.metrics.write(average_records(self._unlogged))
            self._unlogged = []
        return record

    def _completion_stats(self, groups: list[Group]) -> dict[str, float]:
        lengths = [len(c) for g in groups for c in g.completion_ids]
        truncated = [t for g in groups for t in g.truncated]
        out = {"completions/mean_length": sum(lengths) / len(lengths), "completions/max_length": max(lengths),
               "completions/clipped_ratio": sum(truncated) / len(truncated)}
        if self.task is not None:
            correct = [c for g in groups for c in (g.correct or [])]
            out["accuracy"] = sum(correct) / max(len(correct), 1)
        return out

    def _log_completions(self, groups: list[Group], rewards: torch.Tensor, advantages: torch.Tensor,
                         step: int) -> None:
        count, wanted = len(groups) * self.config.num_generations, self.config.num_completions_to_print
        n = 0 if not self.config.log_completions else count if wanted is None else min(wanted, count)
        for i in range(n):
            g, j = i % len(groups), i // len(groups)  # the first completion of each group, then the second...
            group = groups[g]
            prompt = group.row["prompt"]
            self.completions_log.write({
                "step": step, "prompt": prompt if isinstance(prompt, str) else str(prompt[-1].get("content", "")),
                "completion": group.texts[j], "reward": nan_to_none(rewards[g, j].item()),
                "rewards": {name: nan_to_none(group.rewards[f, j].item()) for f, name in enumerate(self.reward_names)},
                "advantage": round(advantages[g, j].item(), 4),
                **({"correct": group.correct[j]} if group.correct is not None else {})})

    def evaluate(self) -> EvalResult | None:
        """Greedy held-out accuracy with the task's checker (None without a task or eval rows)."""
        if self.task is None or not self.eval_rows:
            return None
        rows = self.dist.shard(self.eval_rows)  # under torchrun each rank scores its share
        mine = evaluate_rows(self.model, self.tokenizer, self.task, rows,
                             max_new_tokens=self.config.max_completion_length, seed=self.config.seed,
                             system_prompt=self.config.system_prompt,
                             max_prompt_length=self.config.max_prompt_length,
                             plan=self.inference_plan()) if rows else None
        result = merge_eval_results([r for r in self.dist.gather(mine) if r is not None])
        self.model.train()
        self._last_eval = result
        return result

    # ------------------------------------------------------------------ saving and resuming

    def _trainer_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of this trainer, for an exact resume."""
        return {"step": self.step, "generations": self.generations, "max_steps": self.total_steps,
                "data_order": self.order.state_dict(), "unlogged": self._unlogged,
                "completions_per_step": self._completions_per_step}

    @property
    def _completions_per_step(self) -> int:
        cfg = self.config
        return cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * self.dist.world_size

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        """This trainer's part of resuming from the checkpoint at `path`."""
        cfg = self.config
        saved = (state["data_order"]["batch_size"] * cfg.num_generations, state["completions_per_step"])
        if saved != (cfg.completions_per_generation, self._completions_per_step):
            raise ThriftyError(
                f"{path} was trained with {saved[0]} completions per generation and {saved[1]} per optimizer step; "
                f"this run has {cfg.completions_per_generation} and {self._completions_per_step} "
                f"(per_device_train_batch_size x gradient_accumulation_steps x {self.dist.world_size} processes). "
                "Keep both the same to resume: e.g. with half the processes, double per_device_train_batch_size "
                "or gradient_accumulation_steps (and steps_per_generation).")
        self.order.load_state_dict(state["data_order"])
        self.step, self.generations = int(state["step"]), int(state["generations"])
        if self.step > self.total_steps:
            raise ThriftyError(f"{path} is at step {self.step}, past this run's {self.total_steps} steps; raise "
                               "max_steps to train further.")
        self.metrics.keep_until(self.step)
        self.completions_log.keep_until(self.step)
        self._unlogged = state.get("unlogged", [])
        self.log(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ reporting

    def _describe_run(self) -> str:
        return describe_run(self)


def _per_function(groups: list[Group]) -> torch.Tensor:
    """[num_funcs, groups, G]: each reward function's values, group by group."""
    return torch.stack([g.rewards for g in groups], dim=1)


def _crossed(before: int, after: int, every: int | None) -> bool:
    """Whether a multiple of `every` lies in (before, after]: a generation can make
    several optimizer steps at once, and logging/eval steps count optimizer steps."""
    return bool(every) and after // every > before // every

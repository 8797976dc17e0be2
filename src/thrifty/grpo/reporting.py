"""What a GRPO run tells a person: the plan, the live status line, the summary, and the
held-out answers before and after; one metrics line per logging window."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thrifty.grpo.evaluation import EvalResult
from thrifty.layers.lora import trainable_parameters
from thrifty.layers.quant import weight_memory_bytes


@dataclass
class GRPOResult:
    global_step: int
    initial_eval: EvalResult | None
    final_eval: EvalResult | None
    output_path: Path | None
    mean_reward_first: float | None  # of the first logged step
    mean_reward_last: float | None
    seconds: dict[str, float] = field(default_factory=dict)  # total generation / scoring / training
    peak_rss_mb: float = 0.0



def describe_run(trainer: Any) -> str:
    """The plan of a run, from a GRPOTrainer."""
    cfg = trainer.config
    source = f"task {cfg.task!r}" if trainer.task is not None else "prompts"
    return (f"GRPO ({trainer.run.method.name}) of {trainer.run.base_model_name} [{cfg.dtype}, base weights "
            f"{weight_memory_bytes(trainer.model) / 2**20:.0f} MB]: {trainable_parameters(trainer.model)}\n"
            f"  {len(trainer.rows)} train {source}, {len(trainer.eval_rows)} held out; {trainer.total_steps} "
            f"optimizer steps; each generation {cfg.prompts_per_generation} prompts x {cfg.num_generations} "
            f"completions (<= {cfg.max_completion_length} tokens) in {cfg.micro_batches_per_generation} "
            f"micro-batches of {cfg.per_device_train_batch_size}"
            + (f" x {cfg.world_size} processes" if cfg.world_size > 1 else "") + f", feeding {cfg.updates_per_generation} optimizer "
            f"step(s); rewards: {', '.join(trainer.reward_names)}; lr {cfg.learning_rate:g}, beta {cfg.beta:g}, "
            f"loss {cfg.loss_type}; output in {trainer.output_dir}")


def postfix(record: dict[str, Any]) -> str:
    parts = [f"reward={record['reward']:.3f}±{record['reward_std']:.2f}"]
    if "accuracy" in record:
        parts.append(f"acc={record['accuracy']:.2f}")
    parts.append(f"len={record['completions/mean_length']:.0f}")
    if "kl" in record:
        parts.append(f"kl={record['kl']:.4f}")
    if "clip_ratio/region_mean" in record:
        parts.append(f"clip={record['clip_ratio/region_mean']:.3f}")
    parts.append(f"gen/score/train={record['time/generation']:.1f}/{record['time/scoring']:.2f}/"
                 f"{record['time/training']:.1f}s")
    return " ".join(parts)


def summary(result: GRPOResult) -> str:
    parts = [f"done: {result.global_step} steps"]
    if result.mean_reward_first is not None:
        parts.append(f"reward {result.mean_reward_first:.3f} (first step) -> {result.mean_reward_last:.3f} (last)")
    if result.initial_eval is not None and result.final_eval is not None:
        parts.append(f"held-out accuracy {result.initial_eval.accuracy:.1%} -> {result.final_eval.accuracy:.1%}")
    elif result.final_eval is not None:
        parts.append(f"held-out accuracy {result.final_eval.accuracy:.1%}")
    total = sum(result.seconds.values())
    parts.append("time " + " / ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items()) + f" (total {total:.0f}s)")
    parts.append(f"peak RSS {result.peak_rss_mb:.0f} MB")
    if result.output_path is not None:
        parts.append(f"saved {result.output_path}")
    return "; ".join(parts)


def average_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One metrics line for a logging window, as TRL logs: each metric's mean over the
    steps that have it (None and NaN skipped), the last step's number, the peak RSS."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for r in records for k in r):
        values = [r[key] for r in records if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
        if key == "step":
            out[key] = records[-1]["step"]
        elif key == "rss_mb" or key.endswith("/max_length") or key.endswith("_max"):
            out[key] = max(values) if values else None
        elif key.endswith("_min"):
            out[key] = min(values) if values else None
        else:
            out[key] = sum(values) / len(values) if values else None
    return out


def before_and_after(before: EvalResult, after: EvalResult) -> str:
    """The first held-out problems with the greedy answers before and after training."""
    lines = ["held-out examples, before -> after training:"]
    for old, new in zip(before.examples, after.examples):
        prompt = old["prompt"]
        question = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        lines.append(f"  {question}")
        for when, example in (("before", old), ("after ", new)):
            verdict = "right" if example["correct"] else "wrong"
            lines.append(f"    {when} [{verdict}] {_one_line(example['completion'])}")
    return "\n".join(lines)


def _one_line(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def nan_to_none(value: float) -> float | None:
    return None if value != value else round(value, 4)


def average_micro_batch_metrics(per_rank: list[list[dict[str, float] | None]]) -> dict[str, float]:
    """grpo_loss's metrics over the ranks (rank lists of micro-batch dicts, None for a
    stand-in), then averaged over micro-batches as TRL logs them: per micro-batch,
    policy_loss adds up over the ranks (each normalised by the whole micro-batch), means
    are weighted by the ranks' tokens, extremes are the ranks' extremes."""
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for parts in zip(*per_rank):
        parts = [m for m in parts if m is not None]
        tokens = sum(m["num_tokens"] for m in parts)
        combined: dict[str, float] = {}
        for key in parts[0]:
            values = [m[key] for m in parts if m[key] == m[key]]  # NaN: no sequence to take an extreme of
            if key == "num_tokens" or not values:
                continue
            if key == "policy_loss":
                combined[key] = sum(values)
            elif key.endswith(("_min", "/min")):
                combined[key] = min(values)
            elif key.endswith(("_max", "/max")):
                combined[key] = max(values)
            else:
                combined[key] = sum(m[key] * m["num_tokens"] for m in parts) / max(tokens, 1.0)
        for key, value in combined.items():
            totals[key] = totals.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    return {key: totals[key] / counts[key] for key in totals}

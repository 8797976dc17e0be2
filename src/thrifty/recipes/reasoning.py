"""Teach the default model to reason in DeepSeek-R1's format: a supervised cold start on
worked solutions, then GRPO with correctness, format and worked-steps rewards.

    thrifty recipe reasoning                      # ~7 min on 2 cores
    thrifty recipe reasoning sft_steps=30 grpo_steps=10 num_eval_samples=20   # a quick look

1. cold start data: num_cold_start problems of the task's train split, each answered by
   the task's programmatic trace (`<think>` the column method `</think><answer>N</answer>`),
   written to OUTPUT/cold_start.jsonl; the held-out problems come from the other split;
2. SFT (LoRA) on it -> OUTPUT/sft/adapter;
3. GRPO starting from that adapter (the `adapter` config field) with the task's strict
   correctness reward, the think-then-answer format reward and the worked-steps reward
   (the share of the solution's lines written right) -> OUTPUT/grpo/adapter;
4. held-out accuracy and format compliance of the base model, after SFT and after GRPO,
   with the same greedy decoding and checker: OUTPUT/results.md / results.json, the
   curves of both stages in OUTPUT/recipe.png, and answers before and after in
   OUTPUT/samples.md.

Why a cold start: the base model never writes the tags (0% format, 0% accuracy under the
strict checker), so GRPO alone sees no reward to reinforce; a few hundred traces teach the
format and the method, and GRPO then sharpens what SFT leaves approximate. Why the
worked-steps reward: what the SFT model gets wrong is mostly one column; the final answer
alone scores such a completion like one that is wrong throughout, so most groups of
samples carry no signal; rewarding each right line tells them apart.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thrifty.config_io import load_config, refuse_unknown_fields
from thrifty.errors import ThriftyError
from thrifty.formats.loader import load_model
from thrifty.grpo.config import GRPOConfig
from thrifty.grpo.evaluation import EvalResult, evaluate_rows
from thrifty.grpo.tasks import get_task
from thrifty.grpo.trainer import GRPOTrainer
from thrifty.sft.config import SFTConfig
from thrifty.sft.trainer import SFTTrainer
from thrifty.training.metrics import MetricsLog


@refuse_unknown_fields
@dataclass
class ReasoningRecipe:
    output_dir: str = "output/reasoning"
    model_name_or_path: str | None = None  # None: the built-in SmolLM2-135M-Instruct
    # arithmetic's settings; steps_weight: GRPO's process reward for each right line of the
    # worked solution, beside the final answer's correctness and the format
    task_settings: dict[str, Any] = field(default_factory=lambda: {"operand_digits": [3, 3], "steps_weight": 0.5})
    num_eval_samples: int = 100  # held-out problems, greedy
    max_completion_length: int = 160
    seed: int = 42
    # -- cold start (SFT, LoRA)
    num_cold_start: int = 400
    sft_steps: int = 60
    sft_learning_rate: float = 3e-4
    sft_batch_size: int = 8
    lora_r: int = 16
    lora_alpha: float = 32
    # -- GRPO from the SFT adapter
    grpo_steps: int = 60
    grpo_learning_rate: float = 5e-5
    grpo_temperature: float = 1.0
    grpo_dynamic_sampling: bool = False  # DAPO: replace groups whose completions all score the same
    prompts_per_step: int = 4
    num_generations: int = 8
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        """The recipe's own values, named as the recipe names them, before any stage runs
        (the stages' configs are then built and checked before any work, too)."""
        for name in ("num_eval_samples", "max_completion_length", "num_cold_start", "sft_steps", "sft_batch_size",
                     "lora_r", "grpo_steps", "prompts_per_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ThriftyError(f"recipe field {name} must be a whole number of at least 1, got {value!r}.")
        if isinstance(self.num_generations, bool) or not isinstance(self.num_generations, int) \
                or self.num_generations < 2:
            raise ThriftyError(f"recipe field num_generations must be at least 2 (GRPO compares the completions "
                               f"of a prompt), got {self.num_generations!r}.")
        for name in ("sft_learning_rate", "grpo_learning_rate", "grpo_temperature", "lora_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ThriftyError(f"recipe field {name} must be a positive number, got {value!r}.")


@dataclass
class RecipeResult:
    stages: dict[str, EvalResult]  # "base", "sft", "grpo"
    seconds: dict[str, float]
    output_dir: Path


def run_reasoning_recipe(recipe: ReasoningRecipe, log: Callable[[str], None] = print) -> RecipeResult:
    out = Path(recipe.output_dir)
    settings = {**recipe.task_settings, "reasoning": True}
    task = get_task("arithmetic", **settings)
    held_out = task.rows("eval", recipe.num_eval_samples, seed=0)
    # Both stages' configs, checked before the first evaluation starts.
    cold_start = out / "cold_start.jsonl"
    sft = SFTConfig(model_name_or_path=recipe.model_name_or_path, train_file=str(cold_start),
                    output_dir=str(out / "sft"), overwrite_output_dir=True, max_steps=recipe.sft_steps,
                    learning_rate=recipe.sft_learning_rate, per_device_train_batch_size=recipe.sft_batch_size,
                    lr_scheduler_type="cosine", warmup_ratio=0.05, lora_r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
                    max_length=512, logging_steps=5, save_steps=0, num_sample_prompts=0, seed=recipe.seed,
                    disable_tqdm=recipe.disable_tqdm)
    grpo = GRPOConfig(model_name_or_path=recipe.model_name_or_path, adapter=str(out / "sft" / "adapter"),
                      task="arithmetic", task_settings=settings, output_dir=str(out / "grpo"),
                      overwrite_output_dir=True, per_device_train_batch_size=recipe.prompts_per_step *
                      recipe.num_generations, num_generations=recipe.num_generations,
                      max_completion_length=recipe.max_completion_length, learning_rate=recipe.grpo_learning_rate,
                      temperature=recipe.grpo_temperature, dynamic_sampling=recipe.grpo_dynamic_sampling,
                      max_steps=recipe.grpo_steps, num_eval_samples=0, eval_on_start=False, save_steps=0,
                      seed=recipe.seed, disable_tqdm=recipe.disable_tqdm)
    seconds: dict[str, float] = {}
    stages: dict[str, EvalResult] = {}

    def evaluate(name: str, model: Any, tokenizer: Any) -> None:
        started = time.perf_counter()
        stages[name] = evaluate_rows(model, tokenizer, task, held_out, max_new_tokens=recipe.max_completion_length,
                                     num_examples=len(held_out))
        seconds[f"eval {name}"] = time.perf_counter() - started
        log(f"{name}: {stages[name].summary()}")

    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(recipe.model_name_or_path)
    evaluate("base", model, tokenizer)

    started = time.perf_counter()
    rows = task.rows("train", recipe.num_cold_start, seed=recipe.seed)
    with cold_start.open("w", encoding="utf-8") as f:
        for row in rows:
            messages = [*row["prompt"], {"role": "assistant", "content": task.trace(row)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    trained = SFTTrainer(model, tokenizer, sft, log=log).train()
    seconds["sft"] = time.perf_counter() - started
    evaluate("sft", model, tokenizer)

    started = time.perf_counter()
    model, tokenizer = load_model(recipe.model_name_or_path)
    grpo = dataclasses.replace(grpo, adapter=str(trained.output_path))
    GRPOTrainer(model, tokenizer, config=grpo, log=log).train()
    seconds["grpo"] = time.perf_counter() - started
    evaluate("grpo", model, tokenizer)

    _write_report(out, recipe, stages, seconds)
    return RecipeResult(stages, seconds, out)


def _write_report(out: Path, recipe: ReasoningRecipe, stages: dict[str, EvalResult], seconds: dict[str, float]) -> None:
    table = ["| stage | held-out accuracy (greedy) | format compliance | mean length (tokens) |", "|---|---|---|---|"]
    for name, label in (("base", "base model"), ("sft", "after SFT cold start"), ("grpo", "after GRPO")):
        r = stages[name]
        table.append(f"| {label} | {r.accuracy:.0%} | {r.format_rate:.0%} | {r.mean_length:.0f} |")
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    (out / "results.md").write_text("\n".join(table) + f"\n\n{len(stages['base'].examples)} held-out problems; "
                                    f"{timing}; total {sum(seconds.values()) / 60:.1f} min.\n")
    (out / "results.json").write_text(json.dumps({
        "recipe": {k: v for k, v in vars(recipe).items()}, "seconds": seconds,
        "stages": {k: {"accuracy": r.accuracy, "format": r.format_rate, "mean_length": r.mean_length}
                   for k, r in stages.items()}}, indent=2) + "\n")
    sft, grpo = stages["sft"].examples, stages["grpo"].examples
    fixed = [i for i, (a, b) in enumerate(zip(sft, grpo)) if b["correct"] and not a["correct"]]
    broken = [i for i, (a, b) in enumerate(zip(sft, grpo)) if a["correct"] and not b["correct"]]
    samples = ["# The first held-out problems, at each stage\n"]
    for i in range(min(3, len(stages["base"].examples))):
        samples += _sample(stages, i, ("base", "sft", "grpo"))
    samples.append(f"# What GRPO changed\n\nOf {len(sft)} held-out problems, GRPO made {len(fixed)} right that "
                   f"SFT had wrong and {len(broken)} wrong that SFT had right. The first of each:\n")
    for i in fixed[:2] + broken[:1]:
        samples += _sample(stages, i, ("sft", "grpo"))
    (out / "samples.md").write_text("\n".join(samples))
    plot_recipe(out, {name: (r.accuracy, r.format_rate or 0.0) for name, r in stages.items()})


def _sample(stages: dict[str, EvalResult], i: int, names: Sequence[str]) -> list[str]:
    """Markdown of held-out problem i as the stages `names` answered it."""
    lines = [f"## {stages[names[0]].examples[i]['prompt'][-1]['content']}\n"]
    for name in names:
        example = stages[name].examples[i]
        lines.append(f"**{name}** ({'right' if example['correct'] else 'wrong'}):\n\n```\n"
                     f"{example['completion'].strip()}\n```\n")
    return lines


def plot_recipe(out: Path, held_out: dict[str, tuple[float, float]]) -> None:
    """recipe.png: the SFT loss, GRPO's sampled accuracy and format, and the held-out
    (accuracy, format) of each stage."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sft = [r for r in MetricsLog(out / "sft" / "metrics.jsonl").read() if "loss" in r]
    grpo = [r for r in MetricsLog(out / "grpo" / "metrics.jsonl").read() if "reward" in r]
    figure = Figure(figsize=(15, 4))
    FigureCanvasAgg(figure)
    left, right, stages = figure.subplots(1, 3)
    left.plot([r["step"] for r in sft], [r["loss"] for r in sft], marker=".")
    left.set(title="1. SFT cold start on worked solutions", xlabel="step", ylabel="loss")
    steps = [r["step"] for r in grpo]
    for key, label in (("accuracy", "accuracy (sampled)"), ("rewards/format_reward/mean", "format (sampled)"),
                       ("rewards/worked_steps/mean", "worked steps (sampled)")):
        if any(key in r for r in grpo):
            right.plot(steps, [r.get(key) for r in grpo], marker=".", label=label)
    right.set(title="2. GRPO from the SFT adapter", xlabel="step", ylim=(-0.02, 1.3))  # room for the legend
    right.legend(loc="upper left", ncol=2, fontsize="small")
    names = list(held_out)
    positions = range(len(names))
    stages.bar([i - 0.2 for i in positions], [held_out[n][0] for n in names], width=0.4, label="accuracy")
    stages.bar([i + 0.2 for i in positions], [held_out[n][1] for n in names], width=0.4, label="format")
    stages.set_xticks(list(positions), names)
    stages.set(title="3. held-out, greedy: each stage", ylim=(0, 1.05))
    stages.legend()
    figure.tight_layout()
    figure.savefig(out / "recipe.png", dpi=110)


def load_recipe(overrides: Sequence[str] = ()) -> ReasoningRecipe:
    return load_config(ReasoningRecipe, None, overrides)

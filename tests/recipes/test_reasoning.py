"""The reasoning recipe: traces the task's own checker and format reward accept, disjoint
from the held-out problems; GRPO from a saved SFT adapter continues exactly as in one
process; and a short run of the whole recipe on the default model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thrifty.errors import ThriftyError
from thrifty.formats.loader import load_model
from thrifty.grpo.config import GRPOConfig
from thrifty.grpo.rewards import format_reward
from thrifty.grpo.tasks import get_task
from thrifty.grpo.trainer import TIMING_KEYS, GRPOTrainer
from thrifty.layers.lora import lora_state_dict

from thrifty.sft.config import SFTConfig
from thrifty.sft.trainer import SFTTrainer

from tiny_tokenizer import save_tiny_model_dir


@pytest.mark.parametrize("settings", [{"operand_digits": [3, 3]}, {"operand_digits": [4, 2]},
                                      {"operand_digits": [3, 2], "operations": ["-"]},
                                      {"operand_digits": [2, 1], "operations": ["+", "-"]}])
def test_traces_pass_the_checker_and_the_format_reward(settings: dict) -> None:
    task = get_task("arithmetic", reasoning=True, **settings)
    rows = task.rows("train", 300, seed=3)
    traces = [task.trace(row) for row in rows]
    assert all(task.check(trace, row) for trace, row in zip(traces, rows))
    assert format_reward(None, traces) == [1.0] * len(traces)
    # A wrong final answer in the same format is caught.
    wrong = [t.replace(f"<answer>{r['answer']}</answer>", f"<answer>{int(r['answer']) + 1}</answer>")
             for t, r in zip(traces, rows)]
    assert not any(task.check(w, r) for w, r in zip(wrong, rows))
    held_out = {row["prompt"][-1]["content"] for row in task.rows("eval", 200, seed=0)}
    assert held_out and not held_out & {row["prompt"][-1]["content"] for row in rows}


def test_the_worked_steps_reward_scores_the_share_of_right_lines() -> None:
    """steps_weight adds a process reward: 1 for the worked solution, (n-1)/n with one
    column wrong (whatever the final answer says), 0 without a <think>; the rewards see each
    completion's own prompt."""
    task = get_task("arithmetic", reasoning=True, operand_digits=[3, 3], steps_weight=0.5)
    assert task.reward_weights() == [1.0, 0.25, 0.5]
    worked_steps = task.reward_funcs()[2]
    rows = task.rows("train", 2, seed=1)
    traces = [task.trace(row) for row in rows]
    lines = traces[0].splitlines()  # <think>, the problem, ones, tens, hundreds, ..., </think>, <answer>
    ones = lines[2]
    wrong_digit = ones.replace("write", "write 1", 1)
    one_wrong = traces[0].replace(ones, wrong_digit)
    n = len(lines) - 3  # the lines inside <think>
    prompts = [rows[0]["prompt"], rows[0]["prompt"], rows[0]["prompt"], rows[1]["prompt"]]
    answers = [rows[0]["answer"]] * 3 + [rows[1]["answer"]]
    got = worked_steps(prompts, [traces[0], one_wrong, f"<answer>{rows[0]['answer']}</answer>", traces[0]], answer=answers)
    assert got[:3] == [1.0, pytest.approx((n - 1) / n), 0.0]
    assert got[3] < 0.5  # another problem's solution
    assert len(get_task("arithmetic", reasoning=True).reward_funcs()) == 2  # off by default
    with pytest.raises(ThriftyError, match="steps_weight rewards the worked column method"):
        get_task("arithmetic", reasoning=True, operations=["*"], steps_weight=0.5)


def test_traces_refuse_problems_they_cannot_solve() -> None:
    task = get_task("arithmetic", reasoning=True, operand_digits=[2, 2], operations=["*"])
    with pytest.raises(ThriftyError, match="traces are written for two operands with \\+ or -"):
        task.trace(task.rows("train", 1)[0])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-recipe")
    save_tiny_model_dir("llama", directory)
    return directory


def vowels(completions, **kwargs) -> list[float]:  # type: ignore[no-untyped-def]
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def test_grpo_from_a_saved_adapter_continues_as_in_one_process(tiny_dir: Path, tmp_path: Path) -> None:
    rows = [{"prompt": f"say {w}", "completion": f"{w} {w}"} for w in ("red", "blue", "sun", "moon") * 4]
    model, tokenizer = load_model(tiny_dir, dtype="float32", device="cpu")
    sft = SFTTrainer(model, tokenizer, SFTConfig(model_name_or_path=str(tiny_dir), dtype="float32", max_steps=3,
                                                 output_dir=str(tmp_path / "sft"), lora_r=4, lora_alpha=8,
                                                 learning_rate=1e-2, disable_tqdm=True), rows, log=lambda _: None)
    adapter = sft.train().output_path
    grpo_fields = dict(model_name_or_path=str(tiny_dir), dtype="float32", max_steps=2, num_generations=4,
                       per_device_train_batch_size=8, max_completion_length=6, learning_rate=1e-2, disable_tqdm=True)
    prompts = [{"prompt": r["prompt"]} for r in rows]
    in_process = GRPOTrainer(sft.model, tokenizer, [vowels], prompts,
                             GRPOConfig(output_dir=str(tmp_path / "one"), **grpo_fields), log=lambda _: None)
    start = {k: v.clone() for k, v in lora_state_dict(in_process.model).items()}
    fresh, _ = load_model(tiny_dir, dtype="float32", device="cpu")
    from_file = GRPOTrainer(fresh, tokenizer, [vowels], prompts,
                            GRPOConfig(output_dir=str(tmp_path / "two"), adapter=str(adapter), **grpo_fields),
                            log=lambda _: None)
    loaded = lora_state_dict(from_file.model)
    assert loaded.keys() == start.keys() and all(torch.equal(loaded[k], start[k]) for k in start)
    in_process.train()
    from_file.train()

    def metrics(path: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
                for line in (path / "metrics.jsonl").read_text().splitlines()]

    assert metrics(tmp_path / "one") == metrics(tmp_path / "two")


def test_the_recipe_end_to_end_briefly_through_the_cli(tmp_path: Path) -> None:
    """`thrifty recipe reasoning key=value ...`, as a user runs it, shortened."""
    overrides = [f"output_dir={tmp_path}", "num_eval_samples=4", "max_completion_length=48", "num_cold_start=32",
                 "sft_steps=4", "grpo_steps=1", "prompts_per_step=2", "num_generations=2", "disable_tqdm=true"]
    done = subprocess.run([sys.executable, "-m", "thrifty.cli", "recipe", "reasoning", *overrides],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = json.loads((tmp_path / "results.json").read_text())["stages"]
    assert set(stages) == {"base", "sft", "grpo"}
    assert stages["base"]["format"] == 0.0  # the base model never writes the tags
    for name in ("results.md", "samples.md", "recipe.png", "cold_start.jsonl",
                 "sft/adapter/adapter_config.json", "grpo/adapter/adapter_config.json"):
        assert (tmp_path / name).is_file(), name
    # The command prints the table it saved, one row per stage.
    assert (tmp_path / "results.md").read_text() in done.stdout
    for stage, label in (("base", "base model"), ("sft", "after SFT cold start"), ("grpo", "after GRPO")):
        assert f"| {label} | {stages[stage]['accuracy']:.0%} | {stages[stage]['format']:.0%} |" in done.stdout
    assert re.search(r"GRPO made \d+ right that SFT had wrong", (tmp_path / "samples.md").read_text())
    grpo_steps = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    rewarded = [r for r in grpo_steps if "rewards/worked_steps/mean" in r]  # the process reward is on
    assert rewarded and all(0.0 <= r["rewards/worked_steps/mean"] <= 1.0 for r in rewarded)


@pytest.mark.parametrize("override, message", [
    ("num_eval_samples=0", r"recipe field num_eval_samples must be a whole number of at least 1, got 0"),
    ("prompts_per_step=0", r"recipe field prompts_per_step must be a whole number of at least 1, got 0"),
    ("num_generations=1", r"recipe field num_generations must be at least 2"),
    ("grpo_learning_rate=-1", r"recipe field grpo_learning_rate must be a positive number, got -1"),
    ("task_settings={steps_weight: lots}", r"task 'arithmetic': setting steps_weight takes a number, not 'lots'"),
])
def test_bad_recipe_values_are_refused_before_any_stage(tmp_path: Path, override: str, message: str) -> None:
    """Refused by the recipe's own field names before the base model is evaluated: nothing
    is written (the output_dir is not even made) and no traceback is shown."""
    out = tmp_path / "recipe"
    done = subprocess.run([sys.executable, "-m", "thrifty.cli", "recipe", "reasoning", f"output_dir={out}", override],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and re.search(message, done.stderr), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "per_device_train_batch_size" not in done.stderr
    assert not out.exists() and "base:" not in done.stdout

"""The GRPO trainer: reward goes up on a real model, generation uses the live LoRA
weights, the KL reference is the adapter-free model, bad reward functions stop the run
with their name, resume equals an uninterrupted run, and the `thrifty eval` CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thrifty.errors import ThriftyError
from thrifty.formats.loader import load_model
from thrifty.generation.engine import generate_tokens
from thrifty.generation.sampling import SamplingParams
from thrifty.grpo.config import GRPOConfig, load_grpo_config
from thrifty.grpo.evaluation import pass_at_k
from thrifty.grpo.tasks import get_task
from thrifty.grpo.trainer import TIMING_KEYS, GRPOTrainer
from thrifty.layers.lora import lora_layers
from thrifty.model.weights_epoch import advance_weights_epoch

from applied_steps import record_applied_steps
from tiny_tokenizer import save_tiny_model_dir
from weight_updates import COMPARED_ADAM_EPSILON, assert_same_updates

REPO = Path(__file__).resolve().parents[2]


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama-grpo")
    save_tiny_model_dir("llama", directory)
    return directory


def tiny_rows() -> list[dict]:
    words = ["red", "blue", "green", "one", "two", "sun", "moon", "stone"]
    return [{"prompt": f"say {w}", "answer": w} for w in words]


def starts_with_a(completions, **kwargs) -> list[float]:
    return [1.0 if c.startswith("a") else 0.0 for c in completions]


def vowel_share(completions, **kwargs) -> list[float]:
    """A dense reward, so that tiny random models see varied rewards in every group."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def tiny_config(output_dir: Path, tiny_dir: Path, **overrides) -> GRPOConfig:
    values = dict(model_name_or_path=str(tiny_dir), dtype="float32", output_dir=str(output_dir), max_steps=4,
                  num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  max_completion_length=8, learning_rate=1e-2, lora_r=4, lora_alpha=8, save_steps=0,
                  disable_tqdm=True, seed=5)
    values.update(overrides)
    return GRPOConfig(**values)


def tiny_trainer(tiny_dir: Path, config: GRPOConfig, reward_funcs=(vowel_share,)) -> GRPOTrainer:
    model, tokenizer = load_model(tiny_dir, dtype="float32", device="cpu")
    return GRPOTrainer(model, tokenizer, reward_funcs=list(reward_funcs), train_dataset=tiny_rows(), config=config,
                       log=quiet)


def records(output_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    lines = (Path(output_dir) / name).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


# ---------------------------------------------------------------- a real run


def test_real_run_on_default_model_raises_reward(tmp_path: Path) -> None:
    """A few LoRA steps on the default model with an easy reward (the answer starts
    with "The", about half the samples at first): the mean reward of the last two steps
    beats the first two's (measured: 0.5, 0.25 -> 1.0, 1.0)."""
    model, tokenizer = load_model(None, dtype="bfloat16")
    rows = [{"prompt": f"Describe {thing} in one sentence."}
            for thing in ["the sun", "a cat", "the sea", "a tree", "rain", "a city", "the moon", "snow"]]

    def starts_with_the(completions, **kwargs) -> list[float]:
        return [1.0 if completion_text.lstrip().startswith("The") else 0.0
                for completion_text in (c[0]["content"] if isinstance(c, list) else c for c in completions)]

    config = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=4, num_generations=6,
                        per_device_train_batch_size=12, max_completion_length=3, learning_rate=3e-3,
                        lora_r=8, lora_alpha=16, save_steps=0, disable_tqdm=True, seed=1, num_completions_to_print=2)
    result = GRPOTrainer(model, tokenizer, reward_funcs=[starts_with_the], train_dataset=rows, config=config,
                         log=quiet).train()
    rewards = [r["reward"] for r in records(tmp_path / "run")]
    assert len(rewards) == 4
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.2, rewards
    out = tmp_path / "run"
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "rewards.png").is_file()
    assert result.seconds["generation"] > 0 and result.seconds["training"] > 0
    logged = records(out, "completions.jsonl")
    assert logged and {"step", "prompt", "completion", "reward", "advantage"} <= set(logged[0])


# ---------------------------------------------------------------- the pieces


def test_generation_uses_live_lora_weights(tiny_dir: Path, tmp_path: Path) -> None:
    """Changing the adapter changes what rollouts sample, with no merge and no copy:
    the base weights stay untouched and no layer is ever merged."""
    trainer = tiny_trainer(tiny_dir, tiny_config(tmp_path, tiny_dir))
    model, tokenizer = trainer.model, trainer.tokenizer
    base = {name: layer.base_layer.weight.detach().clone() for name, layer in lora_layers(model)}
    prompt_ids = [trainer._prompt_ids(i) for i in range(3)]

    def greedy() -> list[list[int]]:
        tokens, _ = generate_tokens(model, prompt_ids, max_new_tokens=8, sampling=SamplingParams(),
                                    stop_token_ids=(), pad_token_id=tokenizer.pad_token_id)
        return tokens

    before, sampled_before = greedy(), trainer.rollout([0, 1])
    assert trainer.rollout([0, 1])[0].completion_ids == sampled_before[0].completion_ids  # seeded per step
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.5)
    after = greedy()  # a bare generate builds its plan from the weights as they are
    assert after != before
    # The trainer's rollouts run on the run's inference plan, built for a weights epoch: a
    # change the run did not make is not seen until it is announced (the optimizer step does).
    assert [g.completion_ids for g in trainer.rollout([0, 1])] == [g.completion_ids for g in sampled_before]
    advance_weights_epoch(model, trainable_only=True)
    assert [g.completion_ids for g in trainer.rollout([0, 1])] != [g.completion_ids for g in sampled_before]
    for name, layer in lora_layers(model):
        assert not layer.merged
        assert torch.equal(layer.base_layer.weight, base[name])


def test_reference_log_probs_are_the_adapter_free_model(tiny_dir: Path, tmp_path: Path) -> None:
    trainer = tiny_trainer(tiny_dir, tiny_config(tmp_path, tiny_dir, beta=0.1))
    with torch.no_grad():
        for _, layer in lora_layers(trainer.model):
            layer.lora_B.weight.normal_(0, 0.3)  # so policy and reference differ
    groups = trainer.rollout([0, 1, 2])
    advantages = torch.zeros(len(groups) * trainer.config.num_generations)
    batches = [piece.batch for piece in trainer.micro_batches(groups, advantages)]
    plain, _ = load_model(tiny_dir, dtype="float32", device="cpu")
    for batch in batches:
        ref = trainer.reference_log_probs(batch)
        with torch.no_grad():
            expected = trainer.log_probs(batch, plain)
            policy = trainer.log_probs(batch)
        mask = batch.completion_mask.bool()
        torch.testing.assert_close(ref[mask], expected[mask], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(policy[mask], ref[mask], atol=1e-3)
    # The adapters are back on afterwards.
    assert not any(layer.disabled for _, layer in lora_layers(trainer.model))
    # And a short run with beta > 0 logs the KL term.
    trainer.config.max_steps = 2
    trainer.train()
    # The adapters were randomised, so the policy is not the reference: the KL is positive
    # (a KL term computed against the policy itself, or not at all, would be 0 or missing).
    kls = [r["kl"] for r in records(tmp_path)]
    assert kls and all(math.isfinite(kl) and kl > 1e-6 for kl in kls), kls


def test_full_fine_tuning_reference_is_a_frozen_copy(tiny_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, tiny_dir, beta=0.1, use_lora=False, learning_rate=1e-3, max_steps=2)
    trainer = tiny_trainer(tiny_dir, config)
    trainer.train()
    batch = trainer.micro_batches(trainer.rollout([0]), torch.zeros(4))[0].batch
    plain, _ = load_model(tiny_dir, dtype="float32", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(trainer.reference_log_probs(batch), trainer.log_probs(batch, plain))
    assert (tmp_path / "model" / "config.json").is_file()


@pytest.mark.parametrize("mode", ["raises", "wrong_length"])
def test_bad_reward_function_stops_the_run_naming_it(tiny_dir: Path, tmp_path: Path, mode: str) -> None:
    def broken_reward(completions, **kwargs):
        if mode == "raises":
            raise KeyError("score")
        return [1.0] * (len(completions) - 1)

    trainer = tiny_trainer(tiny_dir, tiny_config(tmp_path, tiny_dir), reward_funcs=[vowel_share, broken_reward])
    with pytest.raises(ThriftyError, match="broken_reward"):
        trainer.train()


def test_rows_with_empty_prompts_are_skipped_by_line_and_refused_when_all_are(tiny_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    rows = tiny_rows()[:3] + [{"prompt": "  ", "answer": "x"}, {"prompt": [{"role": "user", "content": ""}]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    model, tokenizer = load_model(tiny_dir, dtype="float32", device="cpu")
    config = tiny_config(tmp_path / "run", tiny_dir, train_file=str(path))
    with pytest.warns(UserWarning, match=r"skipped 2 of 5 rows of .*prompts\.jsonl have an empty prompt: "
                                         r".*prompts\.jsonl line 4, .*prompts\.jsonl line 5\."):
        trainer = GRPOTrainer(model, tokenizer, reward_funcs=[vowel_share], config=config, log=quiet)
    assert [row["prompt"] for row in trainer.rows] == [row["prompt"] for row in tiny_rows()[:3]]
    with pytest.raises(ThriftyError, match=r"2 of 2 rows of train_dataset have an empty prompt: nothing to train "
                                           r"on \(rows\[0\], rows\[1\]\)"):
        GRPOTrainer(model, tokenizer, reward_funcs=[vowel_share], train_dataset=rows[3:], config=config, log=quiet)


def test_reward_funcs_as_trl_takes_them(tiny_dir: Path, tmp_path: Path) -> None:
    """One function or a list (TRL's forms); a string names a reward model, which is one
    entry (not its characters) and refused with what to pass; a non-function is refused."""
    model, tokenizer = load_model(tiny_dir, dtype="float32", device="cpu")
    config = tiny_config(tmp_path, tiny_dir)
    trainer = GRPOTrainer(model, tokenizer, reward_funcs=vowel_share, train_dataset=tiny_rows(), config=config,
                          log=quiet)
    assert trainer.reward_funcs == [vowel_share] and trainer.reward_names == ["vowel_share"]
    for funcs, message in [("org/reward-model", r"reward_funcs\[0\] is 'org/reward-model': reward models"),
                           ([vowel_share, "./rm"], r"reward_funcs\[1\] is '\./rm': reward models"),
                           ([vowel_share, 0.5], r"reward_funcs\[1\] is a float, not a function")]:
        with pytest.raises(ThriftyError, match=message):
            GRPOTrainer(model, tokenizer, reward_funcs=funcs, train_dataset=tiny_rows(), config=config, log=quiet)


def test_dynamic_sampling_and_iterations_run(tiny_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, tiny_dir, dynamic_sampling=True, max_dynamic_sampling_draws=2,
                         num_iterations=2, max_steps=4, mask_truncated_completions=True, loss_type="grpo")
    tiny_trainer(tiny_dir, config, reward_funcs=[starts_with_a, vowel_share]).train()
    logged = records(tmp_path)
    assert len(logged) == 2 and all("dynamic_sampling/draws" in r for r in logged)


def test_logging_steps_average_their_window(tiny_dir: Path, tmp_path: Path) -> None:
    """logging_steps=2 writes one line per 2 steps: the mean of the two steps' metrics
    (as a run logging every step records them), the peak of the RSS."""
    every, windowed = tmp_path / "every", tmp_path / "windowed"
    tiny_trainer(tiny_dir, tiny_config(every, tiny_dir, max_steps=4)).train()
    tiny_trainer(tiny_dir, tiny_config(windowed, tiny_dir, max_steps=4, logging_steps=2)).train()
    steps, windows = records(every), records(windowed)
    assert [r["step"] for r in windows] == [2, 4]
    for window, (first, second) in zip(windows, [steps[0:2], steps[2:4]]):
        for key in ("reward", "loss", "completions/mean_length", "grad_norm"):
            assert window[key] == pytest.approx((first[key] + second[key]) / 2), key
        assert window["completions/max_length"] == max(first["completions/max_length"],
                                                       second["completions/max_length"])


def test_resume_equals_uninterrupted(tiny_dir: Path, tmp_path: Path) -> None:
    """Train 4 steps saving every 2; resume from checkpoint-2 in a fresh trainer: same
    metrics, same sampled completions, same final adapter."""
    options = dict(max_steps=4, save_steps=2, save_total_limit=None, num_iterations=2, beta=0.05, logging_steps=3)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    tiny_trainer(tiny_dir, tiny_config(straight, tiny_dir, **options)).train()
    tiny_trainer(tiny_dir, tiny_config(resumed, tiny_dir, **options)).train()
    expected, expected_completions = records(resumed), records(resumed, "completions.jsonl")
    (resumed / "adapter" / "adapter_model.safetensors").unlink()  # the resumed run must write it again
    again = tiny_trainer(tiny_dir, tiny_config(resumed, tiny_dir, resume_from_checkpoint=str(resumed / "checkpoint-2"),
                                               **options))
    applied = record_applied_steps(again)
    again.train()
    assert applied == [3, 4]  # continued from step 2: not restarted (same metrics either way)
    assert records(resumed) == expected == records(straight)
    assert records(resumed, "completions.jsonl") == expected_completions
    from safetensors.torch import load_file

    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_checks_and_example_loads() -> None:
    config = load_grpo_config(REPO / "examples" / "grpo_arithmetic.yaml", ["max_steps=3"])
    assert config.task == "arithmetic" and config.max_steps == 3 and config.loss_type == "dapo"
    with pytest.raises(ThriftyError, match="num_generations"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ThriftyError, match="temperature"):
        GRPOConfig(temperature=0.0)
    with pytest.raises(ThriftyError, match="min_completion_length"):
        GRPOConfig(max_completion_length=8, min_completion_length=9)


def test_min_completion_length_holds_back_the_stop_tokens(tiny_dir: Path, tmp_path: Path) -> None:
    """The same seeded rollout: without it some completions stop early, with it every
    completion runs to max_completion_length (what bench_grpo.py --fixed-length relies on)."""
    lengths = {}
    for minimum in (0, 24):
        config = tiny_config(tmp_path, tiny_dir, num_generations=8, max_completion_length=24,
                             min_completion_length=minimum)
        groups = tiny_trainer(tiny_dir, config).rollout([0, 1])
        lengths[minimum] = [len(c) for g in groups for c in g.completion_ids]
    assert min(lengths[0]) < 24
    assert lengths[24] == [24] * 16


def test_pass_at_k_estimator() -> None:
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)


def test_eval_cli_runs(tiny_dir: Path, tmp_path: Path) -> None:
    """`thrifty eval` on a GRPO adapter (its base model found from adapter_config.json)."""
    tiny_trainer(tiny_dir, tiny_config(tmp_path, tiny_dir, max_steps=1)).train()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-m", "thrifty", "eval", "--task", "arithmetic", "--adapter",
                           str(tmp_path / "adapter"), "--num-samples", "4", "--k", "2", "--max-new-tokens", "6",
                           "--dtype", "float32", "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["num_problems"] == 4 and result["k"] == 2
    # The command scores what the library scores on the same adapter (greedy, and seeded
    # samples): a CLI that loaded the base alone, or another task split, would differ.
    from thrifty.formats.open_model import open_model
    from thrifty.grpo.evaluation import evaluate_task

    model, tokenizer, _ = open_model(None, tmp_path / "adapter", dtype="float32", device="cpu")
    expected = evaluate_task(model, tokenizer, get_task("arithmetic"), num_samples=4, k=2, max_new_tokens=6, seed=0)
    assert (result["accuracy"], result["pass_at_k"], result["mean_length"]) == (
        expected.accuracy, expected.pass_at_k, expected.mean_length)


def test_grpo_cli_runs_the_demo_config_end_to_end(tmp_path: Path) -> None:
    """`thrifty grpo examples/grpo_arithmetic.yaml` (the `make demo` job), shortened: the real
    model, before/after held-out accuracy and examples, and every output file."""
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-m", "thrifty", "grpo", str(REPO / "examples" / "grpo_arithmetic.yaml"),
                           "max_steps=2", "per_device_train_batch_size=8", "num_generations=4",
                           "max_completion_length=12", "num_eval_samples=6", "save_steps=2", f"output_dir={out}", "disable_tqdm=true"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "held-out before training: accuracy" in proc.stdout
    assert "held-out accuracy" in proc.stdout and "held-out examples, before -> after training:" in proc.stdout
    assert proc.stdout.count("What is ") >= 3  # the examples' questions
    for name in ("metrics.jsonl", "completions.jsonl", "rewards.png", "adapter/adapter_model.safetensors",
                 "checkpoint-2/trainer_state.json"):
        assert (out / name).is_file(), name
    steps = [r for r in records(out) if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]


def test_dynamic_sampling_drops_uninformative_groups_and_refills(tiny_dir: Path, tmp_path: Path) -> None:
    """Prompts about red or blue score every completion 1.0 (no signal): their groups are
    dropped, more prompts are drawn to refill the batch, and only informative groups reach
    the update; the metrics count exactly what happened."""
    draws: list[list[tuple[str, float]]] = []  # per reward call: (prompt, group reward std)

    def some_prompts_tie(prompts, completions, **kwargs):  # type: ignore[no-untyped-def]
        rewards = [1.0 if ("red" in p or "blue" in p) else r for p, r in zip(prompts, vowel_share(completions))]
        groups = [(prompts[i], float(torch.tensor(rewards[i:i + 4]).std())) for i in range(0, len(prompts), 4)]
        draws.append(groups)
        return rewards

    config = tiny_config(tmp_path, tiny_dir, dynamic_sampling=True, max_dynamic_sampling_draws=4, max_steps=3,
                         per_device_train_batch_size=8, gradient_accumulation_steps=1, num_completions_to_print=8)
    tiny_trainer(tiny_dir, config, reward_funcs=[some_prompts_tie]).train()
    logged = records(tmp_path)
    assert sum(r["dynamic_sampling/draws"] for r in logged) == len(draws)
    tied = [g for batch in draws for g in batch if g[1] == 0.0]
    assert any("red" in p or "blue" in p for p, _ in tied)
    assert sum(r["dynamic_sampling/discarded_groups"] for r in logged) == len(tied)
    assert all(r["dynamic_sampling/kept_groups"] == 2 for r in logged)  # refilled to 2 prompts each time
    trained = {c["prompt"] for c in records(tmp_path, "completions.jsonl")}
    assert trained and not any("red" in p or "blue" in p for p in trained)


def adapter_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(output_dir / "adapter" / "adapter_model.safetensors"))


def test_micro_batch_accumulation_equals_one_big_batch(tiny_dir: Path, tmp_path: Path) -> None:
    """The same 16 completions as 2 accumulated micro-batches of 8 or one of 16: the same
    optimizer steps (dapo normalises by the step's tokens either way)."""
    runs = {}
    for name, batch, accumulation in (("accumulated", 8, 2), ("one_batch", 16, 1)):
        config = tiny_config(tmp_path / name, tiny_dir, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, max_steps=3,
                             adam_epsilon=COMPARED_ADAM_EPSILON)
        tiny_trainer(tiny_dir, config).train()
        runs[name] = (records(tmp_path / name), adapter_weights(tmp_path / name))
    (steps_a, weights_a), (steps_b, weights_b) = runs["accumulated"], runs["one_batch"]
    assert [r["reward"] for r in steps_a] == [r["reward"] for r in steps_b]  # the same samples
    for a, b in zip(steps_a, steps_b):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    assert_same_updates(weights_a, weights_b, steps=3, learning_rate=1e-2)


def test_qlora_grpo_trains_the_adapters_on_a_frozen_nf4_base(tiny_dir: Path, tmp_path: Path) -> None:
    """GRPO with quantize: nf4: the NF4 base stays bit for bit, the adapters move, and the
    KL to the reference (the adapters off) is exactly 0 before the first update (LoRA's B
    starts at zero) and positive once the policy has moved."""
    from thrifty.layers.quant import NF4Linear

    config = tiny_config(tmp_path, tiny_dir, quantize="nf4", beta=0.1, max_steps=3, gradient_accumulation_steps=1,
                         per_device_train_batch_size=8)
    trainer = tiny_trainer(tiny_dir, config)
    quantized = {name: m for name, m in trainer.model.named_modules() if isinstance(m, NF4Linear)}
    assert quantized
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in quantized.items()}
    trainer.train()
    for name, module in quantized.items():
        assert all(torch.equal(before[name][k], v) for k, v in module.state_dict().items()), name
    kl = [r["kl"] for r in records(tmp_path)]
    assert kl[0] == 0.0 and kl[-1] > 0.0
    assert any(w.abs().max() > 0 for k, w in adapter_weights(tmp_path).items() if "lora_B" in k)


@pytest.mark.parametrize("variant", ["dynamic_sampling", "qlora", "bf16_native"])
def test_resume_equals_uninterrupted_on_every_path(tiny_dir: Path, tmp_path: Path, variant: str) -> None:
    """As test_resume_equals_uninterrupted, on the paths users run: dynamic sampling (its
    draws continue where they were), a quantized base, and bf16 through the native kernels
    (a model with heads of 64, which they take), each compared with a separate
    uninterrupted run."""
    model_dir = tiny_dir
    options: dict = dict(max_steps=4, save_steps=2, logging_steps=1, num_iterations=2)
    if variant == "dynamic_sampling":
        options.update(dynamic_sampling=True, max_dynamic_sampling_draws=3)
    elif variant == "qlora":
        options.update(quantize="nf4")
    else:
        from thrifty.kernels.native import native_kernel
        from tiny_models import make_hf_model
        from tiny_tokenizer import make_tiny_tokenizer

        if native_kernel("attention_forward") is None:
            pytest.skip("no native kernels on this machine")
        model_dir = tmp_path / "wide"
        make_hf_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2).save_pretrained(model_dir)
        make_tiny_tokenizer().save(model_dir)
        options.update(dtype="bfloat16")

    def trainer(output_dir: Path, **more) -> GRPOTrainer:  # type: ignore[no-untyped-def]
        config = tiny_config(output_dir, model_dir, **{**options, **more})
        model, tokenizer = load_model(model_dir, dtype=config.dtype, device="cpu")
        return GRPOTrainer(model, tokenizer, reward_funcs=[vowel_share], train_dataset=tiny_rows(), config=config,
                           log=quiet)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    trainer(straight).train()
    trainer(resumed, max_steps=2).train()  # stops at step 2 with checkpoint-2, as a killed run would have
    again = trainer(resumed, resume_from_checkpoint="latest")
    applied = record_applied_steps(again)
    again.train()
    assert applied == [3, 4]  # continued from step 2: not restarted (same metrics either way)
    assert records(resumed) == records(straight)
    assert records(resumed, "completions.jsonl") == records(straight, "completions.jsonl")
    a, b = adapter_weights(straight), adapter_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_reasoning_gym_task_trains_with_its_columns(tiny_dir: Path, tmp_path: Path) -> None:
    """task: reasoning_gym:<dataset> through the trainer: each completion's reward call gets
    its own row's answer/question/metadata (reasoning-gym's scorer needs them), and
    held-out accuracy is measured with its checker."""
    seen: list[tuple[str, str, dict]] = []

    def spy(prompts, completions, answer, question, metadata, **kwargs) -> list[float]:  # type: ignore[no-untyped-def]
        seen.extend(zip([p[-1]["content"] for p in prompts], question, metadata))
        return [0.0] * len(completions)

    task = get_task("reasoning_gym:leg_counting")
    # The tiny model's context is 256 tokens; the questions keep their last 200.
    config = tiny_config(tmp_path, tiny_dir, task="reasoning_gym:leg_counting", max_steps=1, num_eval_samples=4,
                         eval_on_start=True, max_prompt_length=200)
    model, tokenizer = load_model(tiny_dir, dtype="float32", device="cpu")
    GRPOTrainer(model, tokenizer, reward_funcs=[*task.reward_funcs(), spy], config=config, log=quiet).train()
    assert len(seen) == config.per_device_train_batch_size * config.gradient_accumulation_steps
    for prompt, asked, metadata in seen:
        assert prompt == asked and all(f"{animal}" in prompt for animal in metadata["animals"])
    logged = records(tmp_path)
    assert "rewards/leg_counting_score/mean" in next(r for r in logged if "reward" in r)
    assert any("eval_accuracy" in r for r in logged)


def test_rollouts_from_quantized_weights_are_corrected_as_trl_corrects_vllm(tiny_dir: Path, tmp_path: Path) -> None:
    """rollout_quantization samples from GGUF blocks of the base while LoRA trains on the
    weights themselves; the sampler's log-probs travel with the completions and the update
    reports TRL's sampling metrics. The logp difference is what quantization makes it: zero
    would mean the rollouts did not come from the quantized copy, and Q4_0 differs more
    than Q8_0."""
    differences = {}
    for quantization in ("q8_0", "q4_0"):
        out = tmp_path / quantization
        trainer = tiny_trainer(tiny_dir, tiny_config(out, tiny_dir, max_steps=2, rollout_quantization=quantization,
                                                     vllm_importance_sampling_mode="token_truncate"))
        group = trainer.rollout([0])[0]
        assert [len(s) for s in group.sampling_log_probs] == [len(c) for c in group.completion_ids]
        assert trainer.inference_plan().quantization == quantization
        trainer.train()
        rows = records(out)
        assert len(rows) == 2
        for row in rows:
            assert 0 < row["sampling/importance_sampling_ratio/min"] <= row["sampling/importance_sampling_ratio/mean"]
            assert row["sampling/importance_sampling_ratio/max"] <= 3.0  # clip_max truncates
            assert row["sampling/sampling_logp_difference/max"] >= row["sampling/sampling_logp_difference/mean"]
        differences[quantization] = sum(row["sampling/sampling_logp_difference/mean"] for row in rows)
    assert 1e-5 < differences["q8_0"] < differences["q4_0"] < 1.0, differences

    out = tmp_path / "uncorrected"
    tiny_trainer(tiny_dir, tiny_config(out, tiny_dir, max_steps=1, rollout_quantization="q8_0",
                                       vllm_importance_sampling_correction=False)).train()
    assert not any(key.startswith("sampling/") for key in records(out)[0])


def test_rollout_quantization_refusals(tiny_dir: Path) -> None:
    with pytest.raises(ThriftyError, match=r"rollout_quantization = 'q4_0': must be null when quantize = 'nf4'"):
        tiny_config(Path("unused"), tiny_dir, rollout_quantization="q4_0", quantize="nf4")
    with pytest.raises(ThriftyError, match=r"rollout_quantization = 'q5_k'"):
        tiny_config(Path("unused"), tiny_dir, rollout_quantization="q5_k")
    with pytest.raises(ThriftyError, match=r"vllm_importance_sampling_clip_min = 2.0: \(2.0\) must be less than"):
        tiny_config(Path("unused"), tiny_dir, vllm_importance_sampling_clip_min=2.0,
                    vllm_importance_sampling_clip_max=1.5)
    with pytest.raises(ThriftyError, match=r"vllm_importance_sampling_clip_max = None: or .*_truncate"):
        tiny_config(Path("unused"), tiny_dir, vllm_importance_sampling_mode="token_truncate",
                    vllm_importance_sampling_clip_max=None)
    with pytest.raises(ThriftyError, match=r"vllm_importance_sampling_mode = 'sequence'"):
        tiny_config(Path("unused"), tiny_dir, vllm_importance_sampling_mode="sequence")

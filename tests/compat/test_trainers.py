"""The trainers with TRL's constructor and fields: the same work as TRL's own GRPOTrainer
for the same batch fields, the same run as Thrifty's own constructor, and a clear error
for every argument or field Thrifty does not have."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
import transformers
import trl
from applied_steps import record_applied_steps
from tiny_tokenizer import save_tiny_model_dir

from thrifty import GRPOConfig, GRPOTrainer, LoraConfig, SFTConfig, SFTTrainer
from thrifty.compat.trl_config import from_trl_config
from thrifty.errors import ThriftyError
from thrifty.formats.loader import load_model

PROMPTS = [f"say {w}" for w in ("red", "blue", "green", "one", "two", "sun", "moon", "stone")]
# steps_per_generation 4 = 2 optimizer steps of 2 micro-batches, each pass twice: a generation
# feeds 4 optimizer steps, so 6 steps take 2 generations of 16 completions (the second
# used for 2 steps only).
BATCH_FIELDS = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=4,
                    num_generations=4, num_iterations=2, max_steps=6, max_completion_length=4)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-compat")
    save_tiny_model_dir("llama", directory)
    return directory


class Counter:
    """A reward function that counts the completions it scores, call by call."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.__name__ = "counter"

    def __call__(self, completions, **kwargs) -> list[float]:  # type: ignore[no-untyped-def]
        self.calls.append(len(completions))
        return [float(len(c)) for c in completions]


def records(path: Path) -> list[dict]:
    skip = {"time/generation", "time/scoring", "time/training", "time/step", "rss_mb", "tokens_per_sec"}
    return [{k: v for k, v in json.loads(line).items() if k not in skip}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_grpo_batch_fields_do_the_work_trl_does(tiny_dir: Path, tmp_path: Path) -> None:
    theirs = Counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    trainer = trl.GRPOTrainer(
        model=model, processing_class=tokenizer, reward_funcs=theirs,
        train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS]),
        args=trl.GRPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], save_strategy="no", use_cpu=True,
                            logging_steps=1, disable_tqdm=True, **BATCH_FIELDS))
    trainer.train()

    ours = Counter()
    result = GRPOTrainer(model=str(tiny_dir), reward_funcs=ours, train_dataset=[{"prompt": p} for p in PROMPTS],
                         args=GRPOConfig(output_dir=str(tmp_path / "ours"), dtype="float32", disable_tqdm=True,
                                         **BATCH_FIELDS), peft_config=LoraConfig(r=4, lora_alpha=8),
                         log=lambda _: None).train()
    assert sum(ours.calls) == sum(theirs.calls) == 32
    assert result.global_step == trainer.state.global_step == 6
    assert [r["step"] for r in records(tmp_path / "ours")] == [4, 6]


def test_trl_constructor_equals_thriftys_own(tiny_dir: Path, tmp_path: Path) -> None:
    """args= / processing_class= / peft_config= / a single reward function / a model name:
    the same run, metric for metric, as Thrifty's positional constructor."""
    rows = [{"prompt": p} for p in PROMPTS]
    fields = dict(dtype="float32", max_steps=2, per_device_train_batch_size=8, num_generations=4,
                  max_completion_length=4, learning_rate=1e-2, disable_tqdm=True, logging_steps=1)
    model, tokenizer = load_model(tiny_dir, dtype="float32", device="cpu")
    GRPOTrainer(model, tokenizer, [Counter()], rows, GRPOConfig(output_dir=str(tmp_path / "own"), lora_r=4, lora_alpha=8,
                                                                lora_target_modules=["q_proj", "v_proj"], **fields),
                log=lambda _: None).train()
    model, tokenizer = load_model(tiny_dir, dtype="float32", device="cpu")
    GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=Counter(), train_dataset=rows,
                args=GRPOConfig(output_dir=str(tmp_path / "trl"), **fields),
                peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                log=lambda _: None).train()
    assert records(tmp_path / "own") == records(tmp_path / "trl")


def test_sft_trl_style_full_fine_tuning_and_resume(tiny_dir: Path, tmp_path: Path) -> None:
    """No peft_config and no adapters with args=: every weight trains, as in TRL (and the log
    says so); formatting_func builds the text; train(resume_from_checkpoint=...) resumes."""
    rows = [{"q": f"what is {i} + 1", "a": str(i + 1)} for i in range(16)]
    said: list[str] = []

    def trainer(steps: int, **extra):  # type: ignore[no-untyped-def]
        return SFTTrainer(model=str(tiny_dir), train_dataset=rows, formatting_func=lambda r: f"{r['q']} = {r['a']}",
                          args=SFTConfig(output_dir=str(tmp_path / "run"), dtype="float32", max_steps=steps,
                                         per_device_train_batch_size=4, learning_rate=1e-3, save_steps=2,
                                         disable_tqdm=True, logging_steps=1, **extra), log=said.append)

    first = trainer(2)
    before = {k: v.clone() for k, v in first.model.state_dict().items()}
    first.train()
    assert any("full fine-tuning" in line for line in said)
    changed = [k for k, v in first.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("mlp" in k for k in changed) and (tmp_path / "run" / "model" / "config.json").is_file()
    again = trainer(4)
    applied = record_applied_steps(again)
    result = again.train(resume_from_checkpoint="latest")
    assert applied == [3, 4]  # continued from checkpoint-2, not restarted
    assert result.global_step == 4 and [r["step"] for r in records(tmp_path / "run")] == [1, 2, 3, 4]


@pytest.mark.parametrize("call, message", [
    (lambda: GRPOConfig(vllm_mode="colocate"), r"GRPOConfig: 'vllm_mode' is not a setting Thrifty has"),
    (lambda: GRPOConfig(use_vllm=True), r"use_vllm.*own engine"),
    (lambda: SFTConfig(max_stesp=3), r"'max_stesp'.*did you mean 'max_steps'"),
    (lambda: SFTConfig(optim="adafactor"), r"optim.*adamw_torch"),
    (lambda: SFTConfig(report_to="wandb"), r"report_to.*'wandb' is not supported"),
    (lambda: GRPOConfig(per_device_train_batch_size=6, num_generations=4), r"generation_batch_size.*6 completions"),
    (lambda: GRPOConfig(steps_per_generation=2, generation_batch_size=32), r"both set and disagree"),
    (lambda: SFTConfig(fp16=True, dtype="float32"), r"dtype = 'float32' and bf16 = None, fp16 = True disagree"),
    (lambda: SFTTrainer(model="x", args=SFTConfig(), callbacks=[]), r"SFTTrainer: 'callbacks' is not supported"),
    (lambda: GRPOTrainer(model="x", reward_funcs=["org/reward-model"], args=GRPOConfig()), r"reward-model names"),
    (lambda: SFTTrainer(model="x", config=SFTConfig(), args=SFTConfig()), r"both config= and args="),
])
def test_what_thrifty_lacks_is_named(call, message: str, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tiny_dir.parent)
    if "reward-model" in message:
        monkeypatch.setattr("thrifty.compat.trainers.load_model", lambda *a, **k: load_model(tiny_dir, dtype="float32"))
    with pytest.raises(ThriftyError, match=message):
        call()


def test_precision_switches_follow_transformers() -> None:
    assert SFTConfig(fp16=True).dtype == "bfloat16" and "bfloat16" in SFTConfig(fp16=True).notices()[0]
    assert SFTConfig(bf16=False, fp16=False).dtype == "float32"
    assert SFTConfig(bf16=True).dtype == "bfloat16" and SFTConfig(save_strategy="no").save_steps == 0
    assert "runs as adamw_8bit" in SFTConfig(optim="paged_adamw_8bit").notices()[0]
    assert SFTConfig(optim="paged_adamw_8bit").eight_bit_optimizer and not SFTConfig().eight_bit_optimizer
    assert SFTConfig(max_seq_length=77).max_length == 77


def test_report_to_tensorboard_writes_the_logged_metrics(tiny_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, tokenizer = load_model(tiny_dir, dtype="float32", device="cpu")
    rows = [{"text": f"what is {i} + 1 = {i + 1}"} for i in range(8)]
    SFTTrainer(model, tokenizer, SFTConfig(output_dir=str(tmp_path), dtype="float32", max_steps=3, logging_steps=1,
                                           per_device_train_batch_size=4, report_to="tensorboard", disable_tqdm=True),
               rows, log=lambda _: None).train()
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    logged = [(r["step"], r["loss"]) for r in records(tmp_path) if "loss" in r]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, pytest.approx(v)) for s, v in logged]
    assert len(logged) == 3 and "lr" in events.Tags()["scalars"]


def test_trls_own_config_objects_are_read_field_by_field(tiny_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """trl.GRPOConfig(...) handed to the trainer: the same run, metric for metric, as
    Thrifty's GRPOConfig with the same fields; a set field Thrifty lacks is named; the
    fields left at TRL's defaults that Thrifty defaults otherwise are listed in a notice."""
    rows = [{"prompt": p} for p in PROMPTS]
    fields = dict(max_steps=2, per_device_train_batch_size=8, num_generations=4, max_completion_length=4,
                  learning_rate=1e-2, logging_steps=1, seed=7)
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model, tokenizer = load_model(tiny_dir, dtype="float32", device="cpu")
    GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=Counter(), train_dataset=rows,
                args=GRPOConfig(output_dir=str(tmp_path / "ours"), dtype="float32", disable_tqdm=True, **fields),
                peft_config=LoraConfig(**lora), log=lambda _: None).train()
    model, tokenizer = load_model(tiny_dir, dtype="float32", device="cpu")
    theirs = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, disable_tqdm=True, **fields)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=Counter(), train_dataset=rows,
                          args=theirs, peft_config=LoraConfig(**lora), log=lambda _: None)
    assert trainer.config.seed == 7 and trainer.config.output_dir == str(tmp_path / "trl")
    notice = capsys.readouterr().err
    assert "read trl.GRPOConfig's fields" in notice and "adam_beta2 (0.99; TRL: 0.999)" in notice
    trainer.train()
    assert records(tmp_path / "ours") == records(tmp_path / "trl")

    # TRL's bf16=False (fp16 left False) trains in float32: the pair is read together.
    assert from_trl_config(trl.SFTConfig(use_cpu=True, bf16=False), SFTConfig).dtype == "float32"
    with pytest.raises(ThriftyError, match=r"SFTConfig: 'neftune_noise_alpha' is not a setting Thrifty has"):
        SFTTrainer(model="x", args=trl.SFTConfig(use_cpu=True, neftune_noise_alpha=5.0))
    with pytest.raises(ThriftyError, match=r"args must be thrifty.SFTConfig or trl.SFTConfig, got "
                                           r"trl.trainer.grpo_config.GRPOConfig"):
        SFTTrainer(model="x", args=trl.GRPOConfig(use_cpu=True))

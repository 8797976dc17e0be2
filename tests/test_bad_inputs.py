"""The mistakes people make, each answered by a ThriftyError that says where (file and
line, or field) and what to do: data files, configs, model files, reward functions,
generation options. Output directories, divergence and interrupted runs are in
tests/training/test_run.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from thrifty.errors import ThriftyError
from thrifty.formats.loader import load_model
from thrifty.generation.engine import generate
from thrifty.grpo.config import GRPOConfig, load_grpo_config
from thrifty.grpo.rewards import call_reward_function
from thrifty.sft.config import load_sft_config
from thrifty.sft.examples import tokenize_dataset
from thrifty.training.rows import load_rows

from tiny_tokenizer import make_tiny_tokenizer, save_tiny_model_dir

Case = Callable[[Path], object]  # given an empty directory, does the bad thing


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def tokenize_file(directory: Path, name: str, text: str) -> object:
    rows = load_rows(write(directory, name, text))
    return tokenize_dataset(rows, make_tiny_tokenizer(), max_length=64)


def jsonl(*rows: object) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


GOOD = {"prompt": "say red", "completion": "blue"}

# name -> (what the user did, a regex the message must match: the place and the remedy)
DATA_CASES: dict[str, tuple[Case, str]] = {
    "jsonl-broken-line": (lambda d: load_rows(write(d, "t.jsonl", jsonl(GOOD) + "{oops\n")), r"t\.jsonl: line 2"),
    "jsonl-not-an-object": (lambda d: load_rows(write(d, "t.jsonl", jsonl(GOOD, [1, 2]))), r"t\.jsonl: line 2"),
    "json-broken": (lambda d: load_rows(write(d, "t.json", '[{"prompt": "a",\n "completion": }]')),
                    r"t\.json: line 2"),
    "csv-ragged": (lambda d: load_rows(write(d, "t.csv", "prompt,completion\na,b\nc,d,e\n")), r"t\.csv row 2 \(line 3\)"),
    "empty-file": (lambda d: load_rows(write(d, "t.jsonl", "")), r"t\.jsonl.*holds no examples"),
    "unknown-extension": (lambda d: load_rows(write(d, "t.txt", "hello")), r"t\.txt.*\.jsonl"),
    "missing-file": (lambda d: load_rows(d / "nope.jsonl"), r"nope\.jsonl"),
    "corrupt-parquet": (lambda d: load_rows(write(d, "t.parquet", "not parquet")), r"t\.parquet.*Parquet"),
    "no-known-columns": (lambda d: tokenize_file(d, "t.jsonl", jsonl({"question": "a", "answer": "b"})),
                         r"t\.jsonl line 1.*(prompt|text|messages)"),
    "completion-missing-later": (lambda d: tokenize_file(d, "t.jsonl", jsonl(GOOD, {"prompt": "a"})),
                                 r"t\.jsonl line 2.*completion"),
    "completion-not-a-string": (lambda d: tokenize_file(d, "t.jsonl", jsonl(GOOD, {"prompt": "a", "completion": ["b"]})),
                                r"t\.jsonl line 2.*completion"),
    "messages-not-a-list": (lambda d: tokenize_file(d, "t.jsonl", jsonl({"messages": "hello"})),
                            r"t\.jsonl line 1.*messages"),
    "message-without-role": (lambda d: tokenize_file(d, "t.jsonl", jsonl({"messages": [{"content": "hi"}]})),
                             r"t\.jsonl line 1.*messages\[0\].*role"),
    "message-unknown-role": (lambda d: tokenize_file(d, "t.jsonl", jsonl(
        {"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "yo"}]})),
        r"t\.jsonl line 1.*messages\[0\].*'usr'.*Rename"),
    "message-content-a-number": (lambda d: tokenize_file(d, "t.jsonl", jsonl(
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "yo"}]})),
        r"t\.jsonl line 1.*messages\[0\].*content.*a number.*string"),
    "message-without-content": (lambda d: tokenize_file(d, "t.jsonl", jsonl(
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]})),
        r"t\.jsonl line 1.*messages\[0\].*no 'content'"),
    "alpaca-without-output": (lambda d: tokenize_file(d, "t.jsonl", jsonl(
        {"instruction": "a", "output": "b"}, {"instruction": "c"})), r"t\.jsonl line 2.*output"),
    "too-long": (lambda d: tokenize_file(d, "t.jsonl", jsonl({"prompt": "red " * 200, "completion": "b"})),
                 r"t\.jsonl line 1.*max_length"),
}


def sft_config(directory: Path, text: str, *overrides: str) -> object:
    return load_sft_config(write(directory, "c.yaml", text), list(overrides))


def grpo_config(directory: Path, text: str, *overrides: str) -> object:
    return load_grpo_config(write(directory, "g.yaml", text), list(overrides))


def eval_task_setting(setting: str) -> object:
    """`thrifty eval --task arithmetic --task-setting ...`'s checks, which run before its model loads."""
    from thrifty.cli import build_parser, run_eval

    return run_eval(build_parser().parse_args(["eval", "--task", "arithmetic", "--task-setting", setting]))


CONFIG_CASES: dict[str, tuple[Case, str]] = {
    "unknown-key": (lambda d: sft_config(d, "max_step: 5\n"), r"c\.yaml line 1.*max_step.*max_steps"),
    "wrong-type": (lambda d: sft_config(d, "learning_rate: fast\n"), r"c\.yaml line 1.*learning_rate"),
    "repeated-key": (lambda d: sft_config(d, "max_steps: 5\nseed: 1\nmax_steps: 9\n"),
                     r"c\.yaml line 3.*max_steps.*line 1"),
    "malformed-yaml": (lambda d: sft_config(d, "max_steps: 5\n  seed: [1\n"), r"c\.yaml line \d+.*malformed"),
    "top-level-list": (lambda d: sft_config(d, "- max_steps\n"), r"c\.yaml.*mapping"),
    "missing-config": (lambda d: load_sft_config(d / "nope.yaml"), r"nope\.yaml.*not found"),
    "infinite-learning-rate": (lambda d: sft_config(d, "learning_rate: .inf\n"), r"c\.yaml.*learning_rate.*positive"),
    "negative-learning-rate": (lambda d: sft_config(d, "", "learning_rate=-1"), r"learning_rate.*positive"),
    "float16-training": (lambda d: sft_config(d, "dtype: float16\n"), r"c\.yaml.*dtype.*bfloat16"),
    "unknown-dtype": (lambda d: sft_config(d, "dtype: int4\n"), r"c\.yaml.*dtype"),
    "eval-split-too-big": (lambda d: sft_config(d, "eval_split: 1.5\n"), r"eval_split.*\[0, 1\)"),
    "quantize-without-lora": (lambda d: sft_config(d, "quantize: nf4\nuse_lora: false\n"), r"quantize.*use_lora"),
    "bad-quantize": (lambda d: sft_config(d, "quantize: nf3\n"), r"c\.yaml line 1.*quantize"),
    "bad-override-syntax": (lambda d: sft_config(d, "", "max_steps"), r"max_steps.*key=value"),
    "override-unknown-key": (lambda d: sft_config(d, "", "lora_rank=8"), r"lora_rank.*lora_r"),
    "eval-file-and-split": (lambda d: sft_config(d, "eval_file: e.jsonl\neval_split: 0.1\n"),
                            r"eval_file.*eval_split"),
    "grpo-one-generation": (lambda d: grpo_config(d, "num_generations: 1\n"), r"g\.yaml.*num_generations.*2"),
    "grpo-bad-loss": (lambda d: grpo_config(d, "loss_type: ppo\n"), r"g\.yaml line 1.*loss_type"),
    "grpo-task-and-file": (lambda d: grpo_config(d, "task: arithmetic\ntrain_file: t.jsonl\n"),
                           r"task.*train_file"),
    "grpo-zero-temperature": (lambda d: grpo_config(d, "temperature: 0\n"), r"temperature.*positive"),
    "grpo-partial-group": (lambda d: grpo_config(d, "per_device_train_batch_size: 3\nnum_generations: 2\n"),
                           r"g\.yaml.*generation_batch_size.*3 completions.*multiple of num_generations = 2"),
    "grpo-step-spans-generations": (lambda d: grpo_config(d, "per_device_train_batch_size: 4\nnum_generations: 2\n"
                                                            "gradient_accumulation_steps: 2\nsteps_per_generation: 3\n"),
                                    r"g\.yaml.*steps_per_generation.*multiple of gradient_accumulation_steps = 2"),
    # Told from its size, before tokenizing it (a 50 MB row took 89 s to be refused).
    "huge-row": (lambda d: tokenize_file(d, "t.jsonl", jsonl(GOOD, {"prompt": "a", "completion": "word " * 2_000_000})),
                 r"t\.jsonl line 2: the example holds 10,000,001 characters, far more than max_length=64"),
    # A task setting of the wrong type failed deep in the task or the reward, minutes in.
    "grpo-task-setting-type": (lambda d: grpo_config(d, "task: arithmetic\ntask_settings: {steps_weight: lots}\n"),
                               r"g\.yaml.*setting steps_weight takes a number, not 'lots'"),
    "grpo-task-setting-list": (lambda d: grpo_config(d, "task: arithmetic\n", "task_settings={operand_digits: 3}"),
                               r"setting operand_digits takes a list of integers, not 3"),
    "grpo-task-setting-unknown": (lambda d: grpo_config(d, "task: countdown\ntask_settings: {numbers: 3}\n"),
                                  r"task 'countdown' has no setting numbers; its settings: .*num_numbers"),
    "eval-task-setting-type": (lambda d: eval_task_setting("operand_digits=abc"),
                               r"setting operand_digits takes a list of integers, not 'abc'"),
    # TRL's log_completions is a switch; the count is num_completions_to_print.
    "grpo-log-completions-count": (lambda d: grpo_config(d, "log_completions: 8\n"),
                                   r"g\.yaml line 1: log_completions: expected true or false, got a number 8"),
    "grpo-log-completions-count-in-python": (lambda d: GRPOConfig(log_completions=8),  # type: ignore[arg-type]
                                             r"log_completions.*true or false.*num_completions_to_print"),
}


def hf_config(directory: Path, **fields: object) -> object:
    """A model directory whose config.json holds `fields` over a tiny Llama's."""
    config = {"model_type": "llama", "vocab_size": 97, "hidden_size": 64, "intermediate_size": 112,
              "num_hidden_layers": 2, "num_attention_heads": 4, **fields}
    write(directory, "config.json", json.dumps(config))
    return load_model(directory)


MODEL_CASES: dict[str, tuple[Case, str]] = {
    "no-such-model": (lambda d: load_model(d / "missing"), r"missing"),
    "not-a-gguf": (lambda d: load_model(write(d, "m.gguf", "hello world")), r"m\.gguf.*not a GGUF"),
    "directory-without-config": (lambda d: load_model(d), r"config\.json"),
    "truncated-gguf": (lambda d: load_model(write(d, "t.gguf", "GGUF\x03\x00\x00\x00")),
                       r"t\.gguf.*(truncated|corrupt)"),
    "adapter-as-model": (lambda d: (write(d, "adapter_config.json", "{}"), load_model(d)), r"adapter|config\.json"),
    "gemma3-image-model": (lambda d: hf_config(d, model_type="gemma3", text_config={}),
                           r"config\.json.*Gemma3ForConditionalGeneration.*gemma3_text"),
    "unknown-activation": (lambda d: hf_config(d, hidden_act="relu2"),
                           r"config\.json.*hidden activation 'relu2'.*silu, gelu_pytorch_tanh"),
    "gemma-softcapping": (lambda d: hf_config(d, model_type="gemma3_text", final_logit_softcapping=30.0),
                          r"config\.json.*final_logit_softcapping = 30\.0 is not supported"),
    "gemma-bad-layer-types": (lambda d: hf_config(d, model_type="gemma3_text", layer_types=["sliding_attention"]),
                              r"config\.json.*layer_types.*each of the 2 layers"),
}


def call_reward(func: Callable[..., object]) -> object:
    return call_reward_function(func, ["p1", "p2"], [[{"role": "assistant", "content": "a"}]] * 2)


REWARD_CASES: dict[str, tuple[Case, str]] = {
    "raises": (lambda d: call_reward(lambda **kw: 1 / 0), r"'<lambda>' raised ZeroDivisionError"),
    "wrong-length": (lambda d: call_reward(lambda **kw: [1.0]), r"returned 1 rewards for 2 completions"),
    "returns-a-string": (lambda d: call_reward(lambda **kw: "good"), r"returned str"),
    "returns-infinity": (lambda d: call_reward(lambda **kw: [1.0, float("inf")]), r"inf"),
    "returns-text-items": (lambda d: call_reward(lambda **kw: ["1", "x"]), r"'<lambda>'"),
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    directory = tmp_path_factory.mktemp("tiny")
    save_tiny_model_dir("llama", directory)
    return load_model(directory, dtype="float32", device="cpu")


GENERATION_CASES: dict[str, tuple[Callable[..., object], str]] = {
    "empty-stop-string": (lambda m, t: generate(m, t, "hi", stop=[""]), r"stop strings.*non-empty"),
    "stop-not-a-list": (lambda m, t: generate(m, t, "hi", stop="red"), r"stop strings.*list"),
    "negative-temperature": (lambda m, t: generate(m, t, "hi", temperature=-1), r"temperature=-1.*>= 0"),
    "top-p-zero": (lambda m, t: generate(m, t, "hi", top_p=0.0), r"top_p=0.0"),
    "no-new-tokens": (lambda m, t: generate(m, t, "hi", max_new_tokens=0), r"max_new_tokens.*at least 1"),
    "no-samples": (lambda m, t: generate(m, t, "hi", num_return_sequences=0), r"num_return_sequences.*at least 1"),
    "too-long-for-context": (lambda m, t: generate(m, t, "hi", max_new_tokens=10**6), r"context"),
}


@pytest.mark.parametrize("case", sorted({**DATA_CASES, **CONFIG_CASES, **MODEL_CASES, **REWARD_CASES}))
def test_bad_input_gets_a_clear_error(case: str, tmp_path: Path) -> None:
    action, message = {**DATA_CASES, **CONFIG_CASES, **MODEL_CASES, **REWARD_CASES}[case]
    with pytest.raises(ThriftyError, match=f"(?s){message}"):
        action(tmp_path)


@pytest.mark.parametrize("case", sorted(GENERATION_CASES))
def test_bad_generation_option_gets_a_clear_error(case: str, tiny_model) -> None:  # type: ignore[no-untyped-def]
    action, message = GENERATION_CASES[case]
    with pytest.raises(ThriftyError, match=f"(?s){message}"):
        action(*tiny_model)


def test_the_corpus_is_large() -> None:
    cases = {**DATA_CASES, **CONFIG_CASES, **MODEL_CASES, **REWARD_CASES, **GENERATION_CASES}
    assert len(cases) >= 40

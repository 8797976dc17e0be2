"""YAML configs with key=value overrides: typed parsing and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from thrifty.config_io import dump_yaml, load_config
from thrifty.errors import ThriftyError
from thrifty.sft.config import SFTConfig, load_sft_config


@dataclass
class Demo:
    lr: float = 1e-3
    steps: int = 10
    name: str = "run"
    flag: bool = False
    path: str | None = None
    kind: Literal["linear", "cosine"] = "linear"
    resume: str | bool | None = None
    targets: list[str] | str = "all-linear"
    prompts: list[str] = field(default_factory=list)
    window: int | None = None


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_yaml_values_are_typed(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "lr: 2e-4\nsteps: 30\nname: 2024\nflag: yes\nkind: Cosine\nresume: latest\n"
                           "targets: [q_proj, v_proj]\nprompts: ['a', 'b']\nwindow: null\n")
    c = load_config(Demo, path)
    assert c.lr == 2e-4 and isinstance(c.lr, float)  # PyYAML reads 2e-4 as a string
    assert c.steps == 30 and c.name == "2024" and c.flag is True and c.kind == "cosine"
    assert c.resume == "latest" and c.targets == ["q_proj", "v_proj"] and c.prompts == ["a", "b"]
    assert c.window is None


def test_overrides_parse_by_field_type(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "steps: 5\n")
    c = load_config(Demo, path, ["lr=1e-4", "steps=7", "name=007", "flag=true", "path=null", "resume=true",
                                 "targets=[q_proj, k_proj]", "kind=cosine", "window=3"])
    assert (c.lr, c.steps, c.name, c.flag, c.path, c.resume) == (1e-4, 7, "007", True, None, True)
    assert c.targets == ["q_proj", "k_proj"] and c.kind == "cosine" and c.window == 3
    assert load_config(Demo, None, ["resume=out/checkpoint-4", "targets=all-linear"]).resume == "out/checkpoint-4"
    assert load_config(Demo, None, ["name=a=b"]).name == "a=b"  # only the first '=' splits


def test_unknown_key_names_file_line_and_valid_keys(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "lr: 0.1\n\nstesp: 3\n")
    with pytest.raises(ThriftyError) as err:
        load_config(Demo, path)
    message = str(err.value)
    assert f"{path} line 3" in message and "'stesp'" in message and "did you mean 'steps'" in message
    assert "Valid keys for Demo: lr, steps, name" in message
    with pytest.raises(ThriftyError, match="override 'stesp=3': unknown key 'stesp'.*Valid keys"):
        load_config(Demo, None, ["stesp=3"])


@pytest.mark.parametrize("text, expected", [
    ("steps: many\n", r"steps: expected a whole number \(e.g. 8\), got the string 'many'"),
    ("steps: 1.5\n", r"steps: expected a whole number"),
    ("lr: fast\n", r"lr: expected a number \(e.g. 2e-4 or 0.1\), got the string 'fast'"),
    ("flag: maybe\n", r"flag: expected true or false"),
    ("kind: square\n", r"kind: must be one of 'linear', 'cosine', got the string 'square'"),
    ("prompts: hello\n", r"prompts: expected a list of a string"),
    ("name: [1, 2]\n", r"name: expected a string, got a list"),
])
def test_wrong_types_name_the_key_and_expected_type(tmp_path: Path, text: str, expected: str) -> None:
    path = _yaml(tmp_path, "# line 1 is a comment\n" + text)
    with pytest.raises(ThriftyError, match=expected) as err:
        load_config(Demo, path)
    assert f"{path} line 2" in str(err.value)


def test_bad_override_values_and_forms() -> None:
    with pytest.raises(ThriftyError, match="override steps: expected a whole number"):
        load_config(Demo, None, ["steps=ten"])
    with pytest.raises(ThriftyError, match="not of the form key=value"):
        load_config(Demo, None, ["steps"])


def test_malformed_and_non_mapping_yaml(tmp_path: Path) -> None:
    with pytest.raises(ThriftyError, match=r"malformed YAML .*flow sequence that starts on line 2"):
        load_config(Demo, _yaml(tmp_path, "lr: 0.1\nsteps: [1, 2\n"))
    with pytest.raises(ThriftyError, match="expected a mapping"):
        load_config(Demo, _yaml(tmp_path, "- a\n- b\n"))
    with pytest.raises(ThriftyError, match="config file not found"):
        load_config(Demo, tmp_path / "missing.yaml")
    assert load_config(Demo, _yaml(tmp_path, "# only a comment\n")) == Demo()


def test_sft_config_checks_values_and_names_the_file(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "per_device_train_batch_size: 0\n")
    with pytest.raises(ThriftyError, match=rf"{path}: per_device_train_batch_size = 0: must be at least 1"):
        load_sft_config(path)
    with pytest.raises(ThriftyError, match="quantize = 'nf4' needs use_lora: true"):
        load_sft_config(None, ["quantize=nf4", "use_lora=false"])
    with pytest.raises(ThriftyError, match="quantize: expected one of 'nf4', 'int8', 'gguf' or null, got the string 'fp8'"):
        load_sft_config(None, ["quantize=fp8"])
    assert load_sft_config(None, ["quantize=none"]).quantize is None
    assert load_sft_config(None, ["lora_target_modules=q_proj,v_proj"]).lora_target_modules == ["q_proj", "v_proj"]


def test_relative_data_paths_resolve_next_to_the_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "hi"}\n')
    path = _yaml(tmp_path, "train_file: data/train.jsonl\n")
    monkeypatch.chdir("/")
    assert load_sft_config(path).train_file == str(tmp_path / "data" / "train.jsonl")


def test_dump_round_trips(tmp_path: Path) -> None:
    config = SFTConfig(learning_rate=1e-4, lora_target_modules=["q_proj"], resume_from_checkpoint=True,
                       sample_prompts=["Hi?"], quantize="nf4")
    path = _yaml(tmp_path, dump_yaml(config))
    assert load_sft_config(path) == config


def test_shipped_examples_load() -> None:
    examples = Path(__file__).resolve().parent.parent / "examples"
    for name in ("sft_default.yaml", "sft_qlora.yaml", "sft_full.yaml"):
        config = load_sft_config(examples / name)
        assert Path(config.train_file).is_file(), name


def test_the_config_can_come_from_a_pipe_or_standard_input(tmp_path: Path) -> None:
    """`thrifty plan sft -` reads standard input, `<(...)` a pipe (neither is a regular
    file); errors name "-" as the file."""
    stdin = subprocess.run([sys.executable, "-m", "thrifty", "plan", "sft", "-"],
                           input="per_device_train_batch_size: 3\n", capture_output=True, text=True)
    assert stdin.returncode == 0 and "SFT LoRA, 3 x 1024 tokens per micro-batch" in stdin.stdout, stdin.stderr
    pipe = subprocess.run(["bash", "-c", f"{sys.executable} -m thrifty plan sft <(printf 'max_length: 96\\n')"],
                          capture_output=True, text=True)
    assert pipe.returncode == 0 and "x 96 tokens per micro-batch" in pipe.stdout, pipe.stderr
    bad = subprocess.run([sys.executable, "-m", "thrifty", "plan", "sft", "-"], input="max_lenght: 96\n",
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "- line 1: unknown key 'max_lenght'" in bad.stderr, bad.stderr

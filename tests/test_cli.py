"""`thrifty generate` as a user runs it: a real subprocess on the default model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def thrifty(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "thrifty", *args], capture_output=True,
                          text=True, timeout=300)


def test_generate_answers_with_default_model() -> None:
    result = thrifty("generate", "What is the capital of France?", "--max-new-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_generate_several_prompts_and_samples() -> None:
    result = thrifty("generate", "Name a colour.", "Name an animal.", "-n", "2", "--temperature", "0.8",
                     "--top-p", "0.9", "--seed", "1", "--max-new-tokens", "8", "--system", "Be brief.")
    assert result.returncode == 0, result.stderr
    headers = [line for line in result.stdout.splitlines() if line.startswith("=== prompt")]
    assert len(headers) == 4
    assert headers[0].startswith("=== prompt 1, sample 1") and headers[3].startswith("=== prompt 2, sample 2")


def test_raw_completion_without_chat_template() -> None:
    result = thrifty("generate", "The capital of France is", "--no-chat", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    result = thrifty("generate", "hi", "--model", str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr


def test_bad_sampling_option_is_a_clear_error() -> None:
    result = thrifty("generate", "hi", "--top-p", "1.5")
    assert result.returncode == 2
    assert "top_p" in result.stderr and "Traceback" not in result.stderr

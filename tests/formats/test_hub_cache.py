"""Hub ids resolve offline from a real Hugging Face cache layout (blobs, symlinked
snapshots, refs/main), wherever HF_HUB_CACHE / HF_HOME point; a missing id says where
it looked; the default model's hub ids fall back to the copy Thrifty ships."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from thrifty.errors import ThriftyError
from thrifty.formats.loader import load_model

from tiny_tokenizer import save_tiny_model_dir


def as_hub_cache(model_dir: Path, cache: Path, repo_id: str, commit: str = "0123abcd" * 5) -> Path:
    """Lay `model_dir` out as huggingface_hub does: blobs named by hash, snapshot symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_id_loads_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    source = tmp_path / "source"
    save_tiny_model_dir("qwen2", source)
    home = tmp_path / "hf"
    cache = home / "hub" if variable == "HF_HOME" else home
    as_hub_cache(source, cache, "Org/Tiny-Qwen")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(variable, str(home))
    model, tokenizer = load_model("Org/Tiny-Qwen", dtype="float32", device="cpu")
    reference, reference_tokenizer = load_model(source, dtype="float32", device="cpu")
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert tokenizer.encode("hello world") == reference_tokenizer.encode("hello world")


def test_missing_hub_id_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ThriftyError, match=r"Qwen/Qwen2\.5-0\.5B-Instruct.*not in the local Hugging Face cache.*"
                                           r"models--Qwen--Qwen2\.5-0\.5B-Instruct.*local path"):
        load_model("Qwen/Qwen2.5-0.5B-Instruct")


def test_the_default_models_hub_id_falls_back_to_the_shipped_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        default_model_fp32) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model, _ = load_model("unsloth/SmolLM2-135M-Instruct", dtype="float32", device="cpu")
    assert "using the copy Thrifty ships" in capsys.readouterr().err
    assert torch.equal(model.lm_head.weight, default_model_fp32[0].lm_head.weight)


def test_an_adapter_directory_given_as_a_model_explains_itself(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ThriftyError, match=r"is a LoRA adapter.*--adapter"):
        load_model(tmp_path)

"""open_model's one rule for which base an adapter goes on, the same for inference,
merging and training; and a merge equals the base plus the adapter's delta."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thrifty.errors import ThriftyError
from thrifty.formats.loader import load_model
from thrifty.formats.open_model import open_model
from thrifty.formats.peft_adapter import save_adapter
from thrifty.layers.lora import LoraConfig, apply_lora, lora_state_dict

from tiny_models import make_hf_model, randomise_adapters
from tiny_tokenizer import make_tiny_tokenizer, save_tiny_model_dir

IDS = torch.tensor([[3, 26, 24, 10, 23, 43, 6, 7]])


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    save_tiny_model_dir("llama", tmp_path / "base")
    return tmp_path / "base"


def make_adapter(base: Path, directory: Path, recorded: str | None) -> dict[str, torch.Tensor]:
    model, _ = load_model(base, dtype="float32", device="cpu")
    apply_lora(model, LoraConfig(r=4, lora_alpha=8))
    randomise_adapters(model)
    save_adapter(model, directory, base_model_name_or_path=recorded or "")
    return lora_state_dict(model)


def test_the_recorded_base_when_none_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    weights = make_adapter(tiny_dir, tmp_path / "adapter", recorded=str(tiny_dir))
    notes: list[str] = []
    model, _, base = open_model(None, tmp_path / "adapter", dtype="float32", log=notes.append)
    assert base == str(tiny_dir) and not notes
    got = lora_state_dict(model)
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)


def test_a_named_base_wins_with_a_notice_and_shapes_are_checked(tiny_dir: Path, tmp_path: Path) -> None:
    make_adapter(tiny_dir, tmp_path / "adapter", recorded="some-org/the-original")
    copy = tmp_path / "copy"
    save_tiny_model_dir("llama", copy)  # same architecture, other files
    notes: list[str] = []
    model, _, base = open_model(str(copy), tmp_path / "adapter", dtype="float32", log=notes.append)
    assert base == str(copy)
    assert len(notes) == 1 and "trained on some-org/the-original" in notes[0] and str(copy) in notes[0]
    other = tmp_path / "wide"
    make_hf_model("llama", hidden_size=128).save_pretrained(other)  # another size: its layers do not fit
    make_tiny_tokenizer().save(other)
    with pytest.raises(ThriftyError, match="shape|does not have"):
        open_model(str(other), tmp_path / "adapter", dtype="float32", log=notes.append)


def test_no_base_anywhere_is_an_error_in_every_command(tiny_dir: Path, tmp_path: Path) -> None:
    make_adapter(tiny_dir, tmp_path / "adapter", recorded=None)
    with pytest.raises(ThriftyError, match="names no base model"):
        open_model(None, tmp_path / "adapter")
    with pytest.raises(ThriftyError, match="names no base model"):
        open_model(None, tmp_path / "adapter", merge=True)
    # The commands say the same before loading anything (before: generate silently used the
    # default model, merge refused, training compared paths).
    for args in (["generate", "hi", "--adapter"], ["merge", "--output", str(tmp_path / "m")],
                 ["export-gguf", "--output", str(tmp_path / "m.gguf")]):
        command = [sys.executable, "-m", "thrifty.cli", *args, str(tmp_path / "adapter")]
        if args[0] != "generate":
            command = [sys.executable, "-m", "thrifty.cli", args[0], str(tmp_path / "adapter"), *args[1:]]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and "names no base model" in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    config = tmp_path / "sft.yaml"
    config.write_text(json.dumps({"adapter": str(tmp_path / "adapter"), "output_dir": str(tmp_path / "run")}))
    done = subprocess.run([sys.executable, "-m", "thrifty.cli", "sft", str(config)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and "names no base model" in done.stderr, done.stderr


def test_merge_folds_the_delta_in_float32_and_rounds_once(tiny_dir: Path, tmp_path: Path) -> None:
    make_adapter(tiny_dir, tmp_path / "adapter", recorded=str(tiny_dir))
    live, _, _ = open_model(None, tmp_path / "adapter", dtype="float32")
    merged32, _, _ = open_model(None, tmp_path / "adapter", merge=True, dtype=None)
    merged16, _, _ = open_model(None, tmp_path / "adapter", merge=True, dtype=torch.bfloat16)
    base, _ = load_model(tiny_dir, dtype="float32", device="cpu")
    name = "model.layers.0.self_attn.q_proj"
    layer = live.get_submodule(name)
    expected = base.get_submodule(name).weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    got32 = merged32.get_submodule(name).weight
    torch.testing.assert_close(got32, expected, rtol=0, atol=1e-6)  # fp32 sum: a few ulps
    # bf16: W + sBA computed in fp32 and rounded once: each element is the bf16 rounding of
    # the exact sum (an fp32 ulp of summation order can flip a rare tie, hence 99.9%). A merge
    # in bf16 (W, the product and the sum each rounded) misses on several % of elements.
    got16, once = merged16.get_submodule(name).weight.float(), expected.detach().bfloat16().float()
    assert (got16 == once).float().mean().item() >= 0.999
    assert ((got16 - expected).abs() <= expected.abs() * 2.0**-8 + 1e-30).all()
    with torch.no_grad():
        torch.testing.assert_close(merged32(IDS), live(IDS), rtol=1e-5, atol=1e-5)

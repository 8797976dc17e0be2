"""PEFT-format adapter directories: ours load in PEFT, PEFT's load in ours, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from thrifty.errors import ThriftyError
from thrifty.formats.peft_adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from thrifty.layers.lora import LoraConfig, apply_lora, lora_layers
from thrifty.layers.quant import quantize_model

from tiny_models import LORA_CASES as CASES
from tiny_models import batch, load_ours, make_hf_model, randomise_adapters, save_hf_model


@pytest.fixture()
def base_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "base"
    save_hf_model("qwen2", directory)
    return directory


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_adapter_loads_in_peft(case: str, base_dir: Path, tmp_path: Path) -> None:
    import peft

    ours = apply_lora(load_ours(base_dir), LoraConfig(**CASES[case]))
    randomise_adapters(ours)
    adapter = save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    config = json.loads((adapter / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(base_dir)
    assert "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight" in load_file(adapter / WEIGHTS_NAME) \
        or case == "dora-mlp"
    assert not [p.name for p in adapter.iterdir() if p.name.startswith(".")]  # no temp files left

    reference = peft.PeftModel.from_pretrained(make_hf_model("qwen2"), adapter).eval()
    ids = batch()
    with torch.no_grad():
        assert (ours(ids) - reference(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_in_ours(case: str, base_dir: Path, tmp_path: Path) -> None:
    import peft

    reference = peft.get_peft_model(make_hf_model("qwen2"), peft.LoraConfig(task_type="CAUSAL_LM", **CASES[case]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    reference.eval().save_pretrained(tmp_path / "peft")

    ours = load_adapter(load_ours(base_dir), tmp_path / "peft").eval()
    ids = batch()
    with torch.no_grad():
        assert (ours(ids) - reference(ids).logits).abs().max().item() <= 1e-4
    # A loaded adapter can keep training: adapters trainable, base frozen.
    assert all(layer.lora_A.weight.requires_grad for _, layer in lora_layers(ours))
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".lora_" not in n)


def test_round_trip_and_overwrite(base_dir: Path, tmp_path: Path) -> None:
    ours = apply_lora(load_ours(base_dir), LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    randomise_adapters(ours, seed=1)
    save_adapter(ours, tmp_path / "a", "base")
    randomise_adapters(ours, seed=2)
    save_adapter(ours, tmp_path / "a", "base")  # overwrite in place
    loaded = load_adapter(load_ours(base_dir), tmp_path / "a")
    ids = batch()
    with torch.no_grad():
        assert torch.allclose(loaded(ids), ours(ids), atol=1e-6)
    assert json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["target_modules"] == ["q_proj", "up_proj"]


def test_qlora_adapter_round_trip(base_dir: Path, tmp_path: Path) -> None:
    ours = apply_lora(quantize_model(load_ours(base_dir), "nf4"), LoraConfig(r=4))
    randomise_adapters(ours)
    save_adapter(ours, tmp_path / "q", "base")
    assert json.loads((tmp_path / "q" / CONFIG_NAME).read_text())["target_modules"] == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    loaded = load_adapter(quantize_model(load_ours(base_dir), "nf4"), tmp_path / "q")
    ids = batch()
    with torch.no_grad():
        assert torch.allclose(loaded(ids), ours(ids), atol=1e-6)


def _saved(base_dir: Path, directory: Path) -> Path:
    model = apply_lora(load_ours(base_dir), LoraConfig(r=4, target_modules=["q_proj"]))
    return save_adapter(model, directory, "base")


def _edit_config(directory: Path, **changes) -> None:
    path = directory / CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_load_errors(base_dir: Path, tmp_path: Path) -> None:
    model = load_ours(base_dir)
    with pytest.raises(ThriftyError, match="does not exist"):
        load_adapter(model, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ThriftyError, match="adapter_config.json not found"):
        load_adapter(model, tmp_path / "empty")

    adapter = _saved(base_dir, tmp_path / "no-weights")
    (adapter / WEIGHTS_NAME).unlink()
    with pytest.raises(ThriftyError, match="adapter_model.safetensors not found"):
        load_adapter(model, adapter)

    adapter = _saved(base_dir, tmp_path / "corrupt")
    (adapter / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ThriftyError, match="not a readable safetensors"):
        load_adapter(model, adapter)

    adapter = _saved(base_dir, tmp_path / "modules-to-save")
    _edit_config(adapter, modules_to_save=["lm_head"])
    with pytest.raises(ThriftyError, match="modules_to_save"):
        load_adapter(model, adapter)

    adapter = _saved(base_dir, tmp_path / "ia3")
    _edit_config(adapter, peft_type="IA3")
    with pytest.raises(ThriftyError, match="peft_type"):
        load_adapter(model, adapter)

    adapter = _saved(base_dir, tmp_path / "rank")
    _edit_config(adapter, r=8)
    with pytest.raises(ThriftyError, match=r"shape \(4, 64\).*needs \(8, 64\)"):
        load_adapter(model, adapter)

    adapter = _saved(base_dir, tmp_path / "extra-layer")
    tensors = load_file(adapter / WEIGHTS_NAME)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)
    save_file(tensors, adapter / WEIGHTS_NAME)
    with pytest.raises(ThriftyError, match="layers.7.self_attn.q_proj.*does not have"):
        load_adapter(model, adapter)

    adapter = _saved(base_dir, tmp_path / "embedding")
    tensors = load_file(adapter / WEIGHTS_NAME)
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 97)
    save_file(tensors, adapter / WEIGHTS_NAME)
    with pytest.raises(ThriftyError, match="embedding LoRA"):
        load_adapter(model, adapter)

    # None of the failures above touched the model.
    assert not list(lora_layers(model))


def test_save_needs_adapters(base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ThriftyError, match="no LoRA adapter"):
        save_adapter(load_ours(base_dir), tmp_path / "x", "base")

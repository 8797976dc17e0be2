"""Our decoder against Hugging Face transformers on the same weights and inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from thrifty.formats.build import build_model
from thrifty.formats.hf import load_hf_config, load_hf_state_dict
from thrifty.model.kv_cache import KVCache

from tiny_models import FAMILIES, save_hf_model


def load_ours(directory: Path):
    config = load_hf_config(directory)
    return build_model(config, load_hf_state_dict(directory), source=str(directory)).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers_fp32(family: str, tmp_path: Path) -> None:
    reference = save_hf_model(family, tmp_path)
    ours = load_ours(tmp_path)
    assert ours.config.tie_word_embeddings == FAMILIES[family]["tie_word_embeddings"]
    ids = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kv_cache_decoding_equals_full_forward(family: str, tmp_path: Path) -> None:
    save_hf_model(family, tmp_path)
    model = load_ours(tmp_path)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    cfg = model.config
    cache = KVCache(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 32, cfg.head_dim,
                    torch.float32, "cpu")
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :10], cache=cache)]
        for t in range(10, 24):
            steps.append(model(ids[:, t:t + 1], cache=cache))
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() <= 1e-4


def test_a_gemma3_model_saved_by_thrifty_is_read_by_transformers(tmp_path: Path) -> None:
    """config.json written from our config (layer types, windows, both RoPE bases, the
    query scalar, GeGLU) describes the same model to transformers."""
    import transformers

    from thrifty.formats.hf_export import save_hf_model as save_ours
    from thrifty.formats.loader import load_model

    from tiny_tokenizer import save_tiny_model_dir

    save_tiny_model_dir("gemma3", tmp_path / "source")
    model, tokenizer = load_model(tmp_path / "source", dtype="float32", device="cpu")
    save_ours(model, tokenizer, tmp_path / "saved")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Gemma3ForCausalLM"
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max().item() <= 1e-4

"""Tiny random-weight Hugging Face models of every supported family, saved as real
model directories, for parity tests that need no download."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Small enough to run in milliseconds, big enough to exercise GQA (4 q heads, 2 kv heads).
BASE: dict[str, Any] = dict(
    vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", rope_theta=10000.0, tie_word_embeddings=False),
    "llama-tied": dict(model_type="llama", rope_theta=100000.0, tie_word_embeddings=True),
    "llama3-scaled": dict(
        model_type="llama", rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=32),
    ),
    "qwen2": dict(model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", rope_theta=1000000.0, tie_word_embeddings=False, head_dim=24),
    "mistral": dict(model_type="mistral", rope_theta=10000.0, tie_word_embeddings=False, sliding_window=5),
}


def make_hf_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A transformers model of `family` (config fields overridden by `overrides`) with
    random weights (biases and norms randomised too, so a forgotten bias or norm cannot
    hide behind zeros/ones)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {**BASE, **FAMILIES[family], **overrides}
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    if model_type == "mistral":
        config._attn_implementation = "eager"  # sdpa in transformers ignores nothing, but eager is the clearest reference
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def save_hf_model(family: str, directory: Path, seed: int = 0) -> Any:
    model = make_hf_model(family, seed)
    model.save_pretrained(directory)
    return model

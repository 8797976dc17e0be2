"""Tiny random-weight Hugging Face models of every supported family, saved as real
model directories, for parity tests that need no download; Thrifty's own model loaded
from them, with or without random LoRA adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from thrifty.formats.build import build_model
from thrifty.formats.hf import load_hf_config, load_hf_state_dict
from thrifty.layers.lora import LoraConfig, apply_lora, lora_layers

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
    # Layer 3 of 4 without RoPE (SmolLM3's every 4th).
    "smollm3": dict(model_type="smollm3", rope_theta=2000000.0, tie_word_embeddings=True, num_hidden_layers=4),
    # Local layers (window 5, RoPE base 10k) around a global one (1M, linear scaling), and a
    # query_pre_attn_scalar other than head_dim (as Gemma 3 27B's).
    "gemma3": dict(model_type="gemma3_text", tie_word_embeddings=True, head_dim=32, num_hidden_layers=3,
                   sliding_window=5, query_pre_attn_scalar=24,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                       "rope_theta": 1000000.0}}),
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
    # Norms scale by w (Gemma: by 1 + w, w zero-initialised): random around their identity.
    identity = 0.0 if model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.copy_(torch.randn_like(param) * 0.1 + (identity if "norm" in name else 0.0))
    return model.eval()


def save_hf_model(family: str, directory: Path, seed: int = 0) -> Any:
    model = make_hf_model(family, seed)
    model.save_pretrained(directory)
    return model


VOCAB = BASE["vocab_size"]


def load_ours(directory: Path) -> nn.Module:
    config = load_hf_config(directory)
    return build_model(config, load_hf_state_dict(directory), source=str(directory)).eval()


def randomise_adapters(model: nn.Module, seed: int = 0) -> None:
    """Random lora_B (PEFT inits it to zero, which would make every comparison trivial)
    and a perturbed DoRA magnitude."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.2)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)
            if layer.lora_magnitude_vector is not None:
                m = layer.lora_magnitude_vector
                m.mul_(1 + 0.1 * torch.randn(m.shape, generator=g))


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def lora_model(tmp_path: Path, family: str, dtype: torch.dtype, **lora: object) -> nn.Module:
    save_hf_model(family, tmp_path)
    model = load_ours(tmp_path).to(dtype)
    # Different ranks and alphas inside one group exercise the per-slice scaling.
    config = dict(r=8, lora_alpha=16, rank_pattern={"k_proj": 4, "up_proj": 2}, alpha_pattern={"v_proj": 3})
    apply_lora(model, LoraConfig(**{**config, **lora}))  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero; make every branch count
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


# LoRA settings of the PEFT parity tests.
LORA_CASES = {
    # rank_pattern / alpha_pattern: PEFT's per-module overrides, met in adapters trained elsewhere.
    "lora-all-linear": dict(r=4, lora_alpha=8, target_modules="all-linear",
                            rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}),
    "rslora-qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "dora-mlp": dict(r=4, lora_alpha=6, target_modules=["gate_proj", "down_proj", "k_proj"], use_dora=True),
}

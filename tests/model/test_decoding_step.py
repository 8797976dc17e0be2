"""The decoding step as a sequence of native kernel calls equals the modules' step, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from thrifty.generation.engine import attention_mask, generate_tokens
from thrifty.generation.sampling import SamplingParams
from thrifty.layers.lora import LoraConfig, apply_lora
from thrifty.model.fused_linear import DECODE_ROWS
from thrifty.model.inference_plan import InferencePlan
from thrifty.model.kv_cache import KVCache

from native_support import needs_native
from tiny_models import load_ours, make_hf_model, randomise_adapters


def tiny_model_with_head_dim_64(family: str, directory: Path):  # type: ignore[no-untyped-def]
    """A tiny random model whose heads are 64 wide (the decoding attention kernel's size),
    in bf16 with random LoRA adapters on every linear layer."""
    make_hf_model(family, hidden_size=256).save_pretrained(directory)
    model = apply_lora(load_ours(directory).to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomise_adapters(model)
    return model.eval()


@needs_native
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases, tied embeddings
def test_a_decoding_step_equals_the_modules_step(family: str, tmp_path: Path) -> None:
    model = tiny_model_with_head_dim_64(family, tmp_path)
    config = model.config
    rows, prompt_len = 5, 6
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 97, (rows, prompt_len), generator=generator)
    pads = torch.tensor([0, 2, 0, 1, 3])  # left padding of a different length per row
    key_positions = torch.arange(prompt_len + 4).unsqueeze(0) - pads.unsqueeze(1)
    caches = [KVCache(config.num_hidden_layers, rows, config.num_key_value_heads, prompt_len + 4, config.head_dim,
                      model.dtype, model.device) for _ in range(2)]
    plan = InferencePlan.build(model)
    with torch.inference_mode(), plan.active():
        prefill_mask = attention_mask(key_positions[:, :prompt_len], key_positions[:, :prompt_len], None)
        for cache in caches:
            model.hidden_states(prompt, key_positions[:, :prompt_len].clamp(min=0), prefill_mask, cache)
        step = plan.decoding_step
        assert step is not None
        for position in range(prompt_len, prompt_len + 3):  # three steps, the cache growing
            tokens = torch.randint(3, 97, (rows,), generator=generator)
            query_positions = key_positions[:, position:position + 1]
            mask = attention_mask(query_positions, key_positions[:, :position + 1], None)
            expected = model.hidden_states(tokens.unsqueeze(1), query_positions, mask, caches[0])[:, -1]
            got = step(tokens, query_positions, mask, caches[1])
            assert torch.equal(got, expected)
            assert caches[1].length == caches[0].length == position + 1
            filled = [(a[:, :, :position + 1], b[:, :, :position + 1])
                      for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values)]
            assert all(torch.equal(a, b) for a, b in filled)
        too_many = torch.zeros(DECODE_ROWS + 1, dtype=torch.long)
        assert step(too_many, torch.zeros(DECODE_ROWS + 1, 1, dtype=torch.long), mask, caches[1]) is None
    assert InferencePlan.build(model.float()).decoding_step is None  # float32: the modules' step


@needs_native
def test_generation_with_the_decoding_step_samples_the_same_tokens(tmp_path: Path) -> None:
    model = tiny_model_with_head_dim_64("llama", tmp_path)
    prompts = [[5, 6, 7, 8], [9, 10]]
    sampling = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    plan = InferencePlan.build(model)
    assert plan.decoding_step is not None
    with_step = generate_tokens(model, prompts, max_new_tokens=12, sampling=sampling, num_return_sequences=3, seed=7,
                                plan=plan)
    plan.decoding_step = None  # the same plan, stepping through the modules
    with_modules = generate_tokens(model, prompts, max_new_tokens=12, sampling=sampling, num_return_sequences=3,
                                   seed=7, plan=plan)
    assert with_step == with_modules

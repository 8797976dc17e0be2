"""The inference-only fused projections agree with the modules they stand for."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from thrifty.formats.build import build_model
from thrifty.formats.hf import load_hf_config, load_hf_state_dict

from tiny_models import save_hf_model


@pytest.fixture
def tiny(tmp_path: Path):
    save_hf_model("qwen2", tmp_path)  # q/k/v biases exercise the fused bias
    return build_model(load_hf_config(tmp_path), load_hf_state_dict(tmp_path), str(tmp_path)).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_inference_equals_module_forward(tiny, dtype: torch.dtype) -> None:
    model = tiny.to(dtype)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        separate = model(ids).detach()  # grad mode: plain nn.Linear calls
    with torch.no_grad():
        fused = model(ids)
    assert set(model.model.layers[0].self_attn.__dict__["_fused_for_inference"]) == {"qkv", "o"}
    assert set(model.model.layers[0].mlp.__dict__["_fused_for_inference"]) == {"gate_up", "down"}
    assert set(model.__dict__["_fused_for_inference"]) == {"lm_head"}
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert (fused.float() - separate.float()).abs().max().item() <= tolerance


def test_fused_copy_follows_weight_updates_and_swaps(tiny) -> None:
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(1))
    attn = tiny.model.layers[0].self_attn
    with torch.no_grad():
        before = tiny(ids)
        attn.q_proj.weight.mul_(2.0)  # in place: the fused copy must notice
        after = tiny(ids)
        with torch.enable_grad():
            expected = tiny(ids).detach()
    assert not torch.allclose(before, after)
    assert (after - expected).abs().max().item() <= 1e-5
    # A non-Linear replacement (as LoRA or quantization does) drops the stale copy.
    attn.k_proj = nn.Sequential(attn.k_proj)
    with torch.no_grad():
        tiny(ids)
    assert "qkv" not in attn.__dict__["_fused_for_inference"]
    assert "o" in attn.__dict__["_fused_for_inference"]


def test_model_with_fused_cache_deep_copies(tiny) -> None:
    ids = torch.tensor([[5, 6, 7]])
    model = tiny.to(torch.bfloat16)
    with torch.no_grad():
        original = model(ids)
        clone = copy.deepcopy(model)
        assert torch.equal(clone(ids), original)
    assert clone.model.layers[0].mlp.__dict__["_fused_for_inference"]["gate_up"].layers[0] is clone.model.layers[0].mlp.gate_proj


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_path_uses_live_lora_weights(tiny, dtype: torch.dtype) -> None:
    from thrifty.layers.lora import LoraConfig, apply_lora, disable_lora

    model = apply_lora(tiny, LoraConfig(r=4, lora_alpha=8)).to(dtype)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for step in range(2):  # an optimizer-like in-place update between calls
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.1)
            fused = model(ids)
        with torch.enable_grad():
            expected = model(ids).detach()
        assert "qkv" in model.model.layers[0].self_attn.__dict__["_fused_for_inference"]
        assert (fused.float() - expected.float()).abs().max().item() <= tolerance
    with torch.no_grad(), disable_lora(model):
        without = model(ids)
    with torch.enable_grad(), disable_lora(model):
        base = model(ids).detach()
    assert (without.float() - base.float()).abs().max().item() <= tolerance
    assert (without.float() - fused.float()).abs().max().item() > 10 * tolerance


def test_weights_frozen_checks_once_per_block_and_generation_sees_updates(tiny) -> None:
    from thrifty.generation.engine import generate_tokens
    from thrifty.generation.sampling import SamplingParams
    from thrifty.layers.lora import LoraConfig, apply_lora
    from thrifty.model.fused_linear import weights_frozen

    model = apply_lora(tiny, LoraConfig(r=4, lora_alpha=8)).to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(4))
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    with torch.no_grad():
        for p in lora_b:
            p.copy_(torch.randn_like(p) * 0.1)
        with weights_frozen():
            first = model(ids)
            for p in lora_b:
                p.mul_(3.0)
            # The block's promise is that nothing changes: the copy checked on entry stays in use.
            assert torch.equal(model(ids), first)
        after = model(ids)  # out of the block, every call checks again
        with torch.enable_grad():
            expected = model(ids).detach()
    assert (after.float() - expected.float()).abs().max().item() <= 3e-2
    assert not torch.equal(after, first)

    # Each generate call is one block: an update between two calls is seen by the second.
    greedy = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    prompts = [[3, 4, 5]]
    before_update, _ = generate_tokens(model, prompts, max_new_tokens=6, sampling=greedy)
    with torch.no_grad():
        for p in lora_b:
            p.copy_(torch.randn_like(p))
    after_update, _ = generate_tokens(model, prompts, max_new_tokens=6, sampling=greedy)
    with torch.no_grad():  # the reference: the same greedy decoding without any fused copy
        reference = torch.tensor(prompts)
        for _ in range(6):
            with torch.enable_grad():
                logits = model(reference).detach()
            reference = torch.cat([reference, logits[:, -1:].argmax(-1)], dim=1)
    assert after_update[0] == reference[0, 3:].tolist()
    assert after_update != before_update

"""LoRA / rsLoRA / DoRA against PEFT on the same weights; merge, disable, config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from thrifty.errors import ThriftyError
from thrifty.layers.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    disable_lora,
    lora_layers,
    lora_state_dict,
    merge_adapters,
    merge_lora,
    trainable_parameters,
    unmerge_adapters,
)

from tiny_models import LORA_CASES as CASES
from tiny_models import VOCAB, batch, load_ours, randomise_adapters, save_hf_model


def copy_into_peft(ours: nn.Module, peft_model: nn.Module) -> None:
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            target = peft_model.get_submodule("base_model.model." + name)
            target.lora_A["default"].weight.copy_(layer.lora_A.weight)
            target.lora_B["default"].weight.copy_(layer.lora_B.weight)
            if layer.lora_magnitude_vector is not None:
                target.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)


def loss_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])  # qwen2: q/k/v biases under the adapter
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_peft(family: str, case: str, tmp_path: Path) -> None:
    import peft

    hf = save_hf_model(family, tmp_path)
    ours = apply_lora(load_ours(tmp_path), LoraConfig(**CASES[case]))
    randomise_adapters(ours)
    reference = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", **CASES[case]))
    copy_into_peft(ours, reference)
    assert ({n for n, _ in lora_layers(ours)}
            == {n.removeprefix("base_model.model.") for n, m in reference.named_modules()
                if type(m).__name__ == "Linear" and hasattr(m, "lora_A")})

    ids = batch()
    expected = reference(ids).logits
    got = ours(ids)
    assert (got - expected).abs().max().item() <= 1e-4
    loss_of(expected, ids).backward()
    loss_of(got, ids).backward()
    for name, layer in lora_layers(ours):
        target = reference.get_submodule("base_model.model." + name)
        pairs = [(layer.lora_A.weight, target.lora_A["default"].weight),
                 (layer.lora_B.weight, target.lora_B["default"].weight)]
        if layer.lora_magnitude_vector is not None:
            pairs.append((layer.lora_magnitude_vector, target.lora_magnitude_vector["default"].weight))
        for mine, theirs in pairs:
            assert mine.grad is not None
            assert torch.allclose(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6), name
    # Only adapter weights train; the base stays frozen.
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_equals_adapter_and_disable_equals_base(case: str, tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path)
    base = load_ours(tmp_path)
    ids = batch()
    with torch.no_grad():
        base_logits = base(ids)
        model = apply_lora(load_ours(tmp_path), LoraConfig(**CASES[case]))
        randomise_adapters(model)
        adapted = model(ids)
        assert (adapted - base_logits).abs().max().item() > 1e-2  # the adapter does something
        with disable_lora(model):
            assert (model(ids) - base_logits).abs().max().item() <= 1e-5
        assert torch.equal(model(ids), adapted)  # re-enabled on exit

        # In-place merge / unmerge (what GRPO does around generation).
        before = {n: l.base_layer.weight.clone() for n, l in lora_layers(model)}
        merge_adapters(model)
        assert (model(ids) - adapted).abs().max().item() <= 1e-4
        with disable_lora(model):  # unmerges for the duration, merges again after
            assert (model(ids) - base_logits).abs().max().item() <= 1e-4
        assert all(l.merged for _, l in lora_layers(model))
        unmerge_adapters(model)
        for n, l in lora_layers(model):
            assert torch.allclose(l.base_layer.weight, before[n], atol=1e-6)

        merged = merge_lora(model)
        assert not any(isinstance(m, LoraLinear) for m in merged.modules())
        assert type(merged.model.layers[0].mlp.down_proj) is nn.Linear
        assert (merged(ids) - adapted).abs().max().item() <= 1e-4


def test_merged_layer_refuses_training_and_disabled_merged_layer() -> None:
    layer = LoraLinear(nn.Linear(8, 6), r=2, lora_alpha=4)
    layer.merge()
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(ThriftyError, match="unmerge"):
        layer.train()(x)
    layer.disabled = True
    with pytest.raises(ThriftyError, match="unmerge"):
        layer.eval()(x)


def test_starts_as_identity_and_init_matches_peft() -> None:
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layer = LoraLinear(base, r=8, lora_alpha=16)
    x = torch.randn(5, 64)
    assert torch.equal(layer(x), base(x))  # B = 0
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in=64: U(-1/sqrt(64), 1/sqrt(64))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3
    assert layer.scaling == 2.0
    assert LoraLinear(base, r=16, lora_alpha=16, use_rslora=True).scaling == 4.0


def test_bf16_base_keeps_fp32_adapters(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path)
    model = apply_lora(load_ours(tmp_path).to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8))
    randomise_adapters(model)
    ids = batch()
    logits = model(ids)
    assert logits.dtype == torch.bfloat16
    loss_of(logits.float(), ids).backward()
    for _, layer in lora_layers(model):
        assert layer.base_layer.weight.dtype == torch.bfloat16
        assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
        assert layer.lora_A.weight.grad.dtype == torch.float32
        assert layer.lora_B.weight.grad.abs().sum() > 0
    with torch.no_grad():  # the bf16 model with adapters stays close to an fp32 one
        reference = apply_lora(load_ours(tmp_path), LoraConfig(r=4, lora_alpha=8))
        for (_, a), (_, b) in zip(lora_layers(model), lora_layers(reference)):
            b.load_state_dict(a.state_dict())  # same (bf16-rounded) base and adapter weights
        diff = (model(ids).float() - reference(ids)).abs().max().item()
    assert diff < 0.1 * reference(ids).abs().max().item()


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 16), r=4, lora_alpha=8, lora_dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 16)
    assert torch.equal(layer.eval()(x), layer(x))
    assert not torch.equal(layer.train()(x), layer.eval()(x))


def test_3d_input_and_state_dict_keys(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path)
    model = apply_lora(load_ours(tmp_path), LoraConfig(r=2, target_modules=["q_proj"]))
    keys = sorted(lora_state_dict(model))
    assert keys == ["model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.0.self_attn.q_proj.lora_B.weight",
                    "model.layers.1.self_attn.q_proj.lora_A.weight", "model.layers.1.self_attn.q_proj.lora_B.weight"]
    layer = model.model.layers[0].self_attn.q_proj
    assert layer(torch.randn(2, 3, 64)).shape == (2, 3, 64)


def test_trainable_parameters_summary(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path)
    model = load_ours(tmp_path)
    total = sum(p.numel() for p in model.parameters())
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    # q_proj 64->64, down_proj 112->64, two layers: r * (in + out) each.
    expected = 2 * 4 * ((64 + 64) + (112 + 64))
    summary = trainable_parameters(model)
    assert summary.trainable == expected
    assert summary.total == total + expected
    assert summary.percent == pytest.approx(100 * expected / (total + expected))
    assert "trainable%" in str(summary)


def test_config_errors(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path)
    model = load_ours(tmp_path)
    with pytest.raises(ThriftyError, match=r"qproj.*Available: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        apply_lora(model, LoraConfig(target_modules=["qproj"]))
    with pytest.raises(ThriftyError, match="regex"):
        apply_lora(model, LoraConfig(target_modules=r"nothing\.matches"))
    with pytest.raises(ThriftyError, match="positive integer"):
        LoraConfig(r=0)
    with pytest.raises(ThriftyError, match="lora_dropout"):
        LoraConfig(lora_dropout=1.5)
    with pytest.raises(ThriftyError, match="bias='none'"):
        LoraConfig(bias="all")
    with pytest.raises(ThriftyError, match="target_modules"):
        LoraConfig(target_modules=[])
    apply_lora(model, LoraConfig(target_modules=r".*\.mlp\.(up|down)_proj"))
    assert sorted(n for n, _ in lora_layers(model))[0] == "model.layers.0.mlp.down_proj"
    with pytest.raises(ThriftyError, match="already has LoRA"):
        apply_lora(model, LoraConfig())


def test_rank_and_alpha_patterns(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path)
    config = LoraConfig(r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 2})
    model = apply_lora(load_ours(tmp_path), config)
    layers = dict(lora_layers(model))
    assert layers["model.layers.0.self_attn.v_proj"].r == 2
    assert layers["model.layers.0.self_attn.q_proj"].scaling == 2.0
    assert layers["model.layers.1.self_attn.q_proj"].scaling == 0.5

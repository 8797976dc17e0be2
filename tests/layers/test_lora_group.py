"""The training-time LoRA group (one autograd node per q/k/v or gate/up group) computes
what the separate LoraLinear layers compute, values and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from thrifty.formats.build import build_model
from thrifty.formats.hf import load_hf_config, load_hf_state_dict
from thrifty.layers.lora import LoraConfig, apply_lora, disable_lora
from thrifty.layers.lora_group import fusable_lora_group, lora_group_forward
from thrifty.layers.quant import quantize_model

from tiny_models import lora_model, save_hf_model


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: biased q/k/v bases
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_equals_separate_layers(tmp_path: Path, family: str, dtype: torch.dtype) -> None:
    model = lora_model(tmp_path, family, dtype)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    groups = [[attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj], [mlp.down_proj]]
    generator = torch.Generator().manual_seed(1)
    for layers in groups:
        x = torch.randn(2, 5, layers[0].in_features, generator=generator).to(dtype)
        assert fusable_lora_group(layers, x)
        weights = [torch.randn(2, 5, layer.out_features, generator=generator).to(dtype) for layer in layers]
        results = []
        for run in (lambda x: [layer(x) for layer in layers], lambda x: lora_group_forward(layers, x)):
            model.zero_grad(set_to_none=True)
            x_leaf = x.clone().requires_grad_(True)
            outs = run(x_leaf)
            sum((out.float() * w.float()).sum() for out, w in zip(outs, weights)).backward()
            grads = [p.grad.clone() for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
            results.append(([o.detach().float() for o in outs], x_leaf.grad.float(), grads))
        (outs_ref, gx_ref, grads_ref), (outs, gx, grads) = results
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        for out, ref in zip(outs, outs_ref):
            assert out.shape == ref.shape
            assert (out - ref).abs().max().item() <= tolerance * ref.abs().max().item()
        assert (gx - gx_ref).abs().max().item() <= tolerance * gx_ref.abs().max().item()
        for grad, ref in zip(grads, grads_ref):
            assert grad.dtype == torch.float32  # fp32 masters get fp32 gradients
            assert (grad - ref).abs().max().item() <= tolerance * ref.abs().max().item()


def test_model_trains_through_the_group_node(tmp_path: Path) -> None:
    model = lora_model(tmp_path, "llama", torch.bfloat16)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    hidden = model.hidden_states(ids)
    seen, stack = set(), [hidden.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    names = [type(node).__name__ for node in seen]
    # q/k/v, o, gate/up and down of both layers: one node each.
    assert names.count("_LoraGroupBackward") == 8


def test_layers_that_need_their_own_forward_are_not_fused(tmp_path: Path) -> None:
    x = torch.randn(3, 64)
    plain = lora_model(tmp_path / "plain", "llama", torch.float32)
    attn = plain.model.layers[0].self_attn
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    assert fusable_lora_group(layers, x)
    assert not fusable_lora_group(layers, x.bfloat16())  # activations in another dtype
    with disable_lora(plain):
        assert not fusable_lora_group(layers, x)
    attn.q_proj.merge()
    assert not fusable_lora_group(layers, x)
    attn.q_proj.unmerge()
    attn.q_proj.base_layer.weight.requires_grad_(True)  # a trainable base needs its own gradient
    assert not fusable_lora_group(layers, x)

    dropout = lora_model(tmp_path / "dropout", "llama", torch.float32, lora_dropout=0.1).train()
    dropout_layers = [dropout.model.layers[0].mlp.gate_proj, dropout.model.layers[0].mlp.up_proj]
    assert not fusable_lora_group(dropout_layers, x)
    dropout.eval()  # dropout is the identity in eval mode
    assert fusable_lora_group(dropout_layers, x)

    dora = lora_model(tmp_path / "dora", "llama", torch.float32, use_dora=True)
    assert not fusable_lora_group([dora.model.layers[0].mlp.down_proj], torch.randn(3, 112))

    save_hf_model("llama", tmp_path / "nf4")
    quantized = build_model(load_hf_config(tmp_path / "nf4"), load_hf_state_dict(tmp_path / "nf4"), str(tmp_path / "nf4"))
    quantize_model(quantized, "nf4")
    apply_lora(quantized, LoraConfig(r=4))
    assert not fusable_lora_group([quantized.model.layers[0].mlp.down_proj], torch.randn(3, 112))

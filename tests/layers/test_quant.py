"""NF4 (QLoRA, double quantization) and int8 weight-only quantization; QLoRA training."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from thrifty.errors import ThriftyError
from thrifty.formats.build import build_model
from thrifty.formats.hf import load_hf_config, load_hf_state_dict
from thrifty.layers.lora import LoraConfig, apply_lora, lora_layers
from thrifty.layers.quant import (
    ABSMAX_BLOCKSIZE,
    NF4_CODE,
    Int8Linear,
    NF4Linear,
    nearest_code,
    _nf4_indices,
    dequantize_absmax,
    dequantize_nf4,
    dynamic_code_8bit,
    quantize_int8,
    quantize_model,
    quantize_nf4,
    weight_memory_bytes,
)

from tiny_models import save_hf_model

VOCAB = 97


def load_ours(directory: Path):
    return build_model(load_hf_config(directory), load_hf_state_dict(directory), source=str(directory)).eval()


def weights(rows: int = 96, cols: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[3, 7] = 0.5  # an outlier: its block must still quantize sensibly
    return w


# -- NF4 ----------------------------------------------------------------------------

def test_nf4_code_table_is_qloras() -> None:
    code = torch.tensor(NF4_CODE, dtype=torch.float64)
    assert len(NF4_CODE) == 16 and torch.all(code[1:] > code[:-1])
    assert (NF4_CODE[0], NF4_CODE[7], NF4_CODE[15]) == (-1.0, 0.0, 1.0)
    # QLoRA's construction (bitsandbytes create_normal_map, offset 0.9677083): 8 positive
    # and 7 negative normal quantiles plus an exact zero, scaled to [-1, 1].
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat((pos, neg, torch.zeros(1, dtype=torch.float64))).sort().values
    assert torch.allclose(values / values.max(), code, atol=1e-6)


def test_double_quant_code_is_bitsandbytes_dynamic_map() -> None:
    code = dynamic_code_8bit()
    assert code.shape == (256,) and torch.all(code[1:] > code[:-1])
    assert code[0] == -code[-2] and code[-1] == 1.0 and 0.0 in code.tolist()
    assert code[code > 0].min().item() == pytest.approx(5.5e-7)  # 1e-6 * mean(0.1, 1)


def test_fast_nf4_index_equals_bucketize() -> None:
    code = torch.tensor(NF4_CODE)
    midpoints = (code[1:] + code[:-1]) / 2
    edge_cases = torch.cat((midpoints, midpoints.nextafter(torch.tensor(2.0)), midpoints.nextafter(torch.tensor(-2.0)),
                            code, torch.tensor([-1.0, 1.0, 0.0, -0.0])))
    values = torch.cat((torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 2 - 1, edge_cases))
    assert torch.equal(_nf4_indices(values), nearest_code(values, code))


def test_nf4_packing_and_storage_size() -> None:
    w = torch.zeros(2, 64)
    w[0, 0], w[0, 1], w[0, 2] = -1.0, 1.0, 0.0  # codes 0, 15, 7
    q = quantize_nf4(w, double_quant=False)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (64,)
    assert q.packed[0].item() == 0x0F  # first element in the high nibble (bitsandbytes' order)
    assert q.packed[1].item() >> 4 == 7

    w = weights(512, 1024)
    n = w.numel()
    q = quantize_nf4(w)
    assert q.packed.numel() == n // 2
    blocks = n // 64
    assert q.absmax.dtype == torch.uint8 and q.absmax.numel() == blocks
    assert q.nbytes == n // 2 + blocks + 4 * -(-blocks // ABSMAX_BLOCKSIZE) + 4
    assert 0.5 < q.nbytes / n < 0.52  # ~0.516 byte per parameter vs 2 for bf16


def test_nf4_round_trip_error_bound() -> None:
    w = weights()
    code = torch.tensor(NF4_CODE)
    half_gap = (code[1:] - code[:-1]).max().item() / 2
    q = quantize_nf4(w, double_quant=False)
    error = (dequantize_nf4(q) - w).reshape(-1, 64).abs()
    absmax = w.reshape(-1, 64).abs().amax(dim=1)
    assert torch.equal(q.absmax, absmax)
    assert torch.all(error.amax(dim=1) <= half_gap * absmax * (1 + 1e-6))
    # Stronger: every value got the nearest code.
    scaled = (w.reshape(-1, 64) / absmax[:, None]).reshape(-1, 1)
    nearest = (scaled - code).abs().amin(dim=1)
    got = (dequantize_nf4(q).reshape(-1, 64) / absmax[:, None]).reshape(-1)
    assert torch.allclose((scaled.squeeze(1) - got).abs(), nearest, atol=1e-6)
    # An odd-sized tensor with a partial last block works too.
    odd = torch.randn(7, 9)
    assert (dequantize_nf4(quantize_nf4(odd)) - odd).abs().max() <= half_gap * odd.abs().max() * 1.01


def test_double_quant_saves_scale_memory_and_keeps_error() -> None:
    w = weights(512, 1024)
    single = quantize_nf4(w, double_quant=False)
    double = quantize_nf4(w, double_quant=True)
    assert torch.equal(single.packed, double.packed)  # only the scales change
    scale_bytes_single = single.absmax.numel() * 4
    scale_bytes_double = double.nbytes - double.packed.numel()
    assert scale_bytes_double < 0.27 * scale_bytes_single  # 8.06 vs 32 bits per block
    # The 8-bit scales are close to the fp32 ones ...
    assert (dequantize_absmax(double) - single.absmax).abs().max() <= 0.01 * single.absmax.max()
    # ... so the weight error barely moves.
    err_single = (dequantize_nf4(single) - w).abs().mean()
    err_double = (dequantize_nf4(double) - w).abs().mean()
    assert err_double <= 1.02 * err_single


def test_nf4_linear_forward_backward_and_saved_memory() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    layer = NF4Linear.from_linear(linear)
    assert layer.in_features == 256 and layer.out_features == 96 and layer.bias is not None
    w = layer.dequantize(torch.float32)
    x = torch.randn(2, 5, 256, requires_grad=True)

    saved: list[torch.Size] = []
    def pack(t):
        saved.append(t.shape)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    # Autograd keeps no dequantized copy of the weight: backward dequantizes again.
    assert torch.Size([96, 256]) not in saved
    assert out.shape == (2, 5, 96)
    expected = x.detach() @ w.t() + linear.bias.detach()
    assert torch.allclose(out, expected, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.allclose(x.grad, grad @ w, atol=1e-5)
    assert layer.bias.grad is None and not any(p.requires_grad for p in layer.parameters())

    # bf16 activations: the weight is dequantized in fp32 and rounded once to bf16.
    xb = x.detach().to(torch.bfloat16)
    with torch.no_grad():
        outb = layer.to(torch.bfloat16)(xb)
    assert outb.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(torch.bfloat16), w.to(torch.bfloat16))  # scales survived .to(bf16)
    assert (outb.float() - expected).abs().max() <= 0.02 * expected.abs().max()


# -- int8 ---------------------------------------------------------------------------

def test_int8_quantization_error_and_layer() -> None:
    w = weights()
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (96,)
    error = (q.float() * scales[:, None] - w).abs()
    assert torch.all(error.amax(dim=1) <= scales / 2 * (1 + 1e-5))

    linear = nn.Linear(256, 96, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = Int8Linear.from_linear(linear)
    dequant = layer.dequantize(torch.float32)
    x = torch.randn(3, 4, 256, requires_grad=True)
    out = layer(x)
    assert torch.allclose(out, x.detach() @ dequant.t(), atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.allclose(x.grad, grad @ dequant, atol=1e-5)


def test_int8_uses_weight_int8pack_mm_for_small_bf16_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(torch, "_weight_int8pack_mm"):
        pytest.skip("this torch has no _weight_int8pack_mm")
    layer = Int8Linear.from_linear(nn.Linear(256, 96, bias=True)).to(torch.bfloat16)
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 1, 256, dtype=torch.bfloat16)  # one decoding step
    with torch.no_grad():
        fast = layer(x)
        big = layer(x.expand(4, 16, 256))  # 64 rows: dequantize + matmul is faster there
    assert len(calls) == 1
    expected = x.float() @ layer.dequantize(torch.float32).t() + layer.bias.float()
    assert (fast.float() - expected).abs().max() <= 0.02 * expected.abs().max()
    assert (big[0, :1].float() - fast.float()).abs().max() <= 0.02 * expected.abs().max()


# -- whole models -------------------------------------------------------------------

def test_quantize_model_replaces_decoder_linears(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path)
    reference = load_ours(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids)
    for method, kind, tolerance in (("nf4", NF4Linear, 0.15), ("int8", Int8Linear, 0.02)):
        model = quantize_model(load_ours(tmp_path), method)
        layer = model.model.layers[1]
        for sub in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
            assert type(sub) is kind
        assert type(model.lm_head) is nn.Linear
        # The tight reference: the unquantized model given the dequantized weights. The
        # quantized model must compute exactly that (float32 rounding apart)...
        rebuilt = load_ours(tmp_path)
        rebuilt_linears = dict(rebuilt.named_modules())
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, kind):
                    rebuilt_linears[name].weight.copy_(module.dequantize(torch.float32))
            got, exact = model(ids), rebuilt(ids)
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
        # ...and the quantization error itself stays in its known range (NF4: 4 bits/weight).
        assert (got - expected).abs().max() <= tolerance * expected.abs().max(), method


def test_quantize_model_errors(tmp_path: Path) -> None:
    save_hf_model("llama-tied", tmp_path)
    with pytest.raises(ThriftyError, match="tied"):
        quantize_model(load_ours(tmp_path), "nf4", skip=())
    with pytest.raises(ThriftyError, match="'nf4'"):
        quantize_model(load_ours(tmp_path), "fp8")  # type: ignore[arg-type]
    model = apply_lora(load_ours(tmp_path), LoraConfig(r=2))
    with pytest.raises(ThriftyError, match="apply_lora"):
        quantize_model(model, "nf4")


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_qlora_trains_only_adapters(method: str, tmp_path: Path) -> None:
    save_hf_model("qwen2", tmp_path)  # qwen2: a frozen bias under the quantized layers
    torch.manual_seed(0)
    model = apply_lora(quantize_model(load_ours(tmp_path), method), LoraConfig(r=8, lora_alpha=16))
    assert all(type(layer.base_layer) is (NF4Linear if method == "nf4" else Int8Linear)
               for _, layer in lora_layers(model))
    frozen = {name: t.clone() for name, t in model.state_dict().items() if ".lora_" not in name}
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        logits = model(ids)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    for name, t in model.state_dict().items():
        if name in frozen:
            assert torch.equal(t, frozen[name]), name


def test_default_model_weight_memory(default_model_fp32) -> None:
    """Resident weight bytes of SmolLM2-135M: bf16 vs NF4 vs int8, and that the
    quantized models still predict like the original."""
    model, tokenizer = default_model_fp32
    bf16 = copy.deepcopy(model).to(torch.bfloat16)  # copy before any forward caches anything
    quantized = {method: quantize_model(copy.deepcopy(bf16), method) for method in ("nf4", "int8")}
    layers_bf16 = weight_memory_bytes(bf16, "model.layers")
    sizes = {"bf16": (weight_memory_bytes(bf16), layers_bf16)}
    for method, q in quantized.items():
        sizes[method] = (weight_memory_bytes(q), weight_memory_bytes(q, "model.layers"))
    print("\nresident weight bytes (whole model, decoder layers):", sizes)
    assert sizes["nf4"][1] < 0.35 * layers_bf16
    assert sizes["int8"][1] < 0.55 * layers_bf16
    ids = torch.tensor([tokenizer.encode("Paris is the capital of France, and Berlin is the capital of Germany.")])
    with torch.no_grad():
        expected = model(ids).argmax(-1)
        for method, min_agreement in (("nf4", 0.7), ("int8", 0.9)):
            agreement = (quantized[method](ids).argmax(-1) == expected).float().mean().item()
            assert agreement >= min_agreement, (method, agreement)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_quantized_base_needs_dequantize(use_dora: bool, tmp_path: Path) -> None:
    from thrifty.layers.lora import merge_lora

    from tiny_models import randomise_adapters

    save_hf_model("llama", tmp_path)
    model = apply_lora(quantize_model(load_ours(tmp_path), "nf4"), LoraConfig(r=4, use_dora=use_dora))
    randomise_adapters(model)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids)
    with pytest.raises(ThriftyError, match="dequantize=True"):
        merge_lora(model)
    with pytest.raises(ThriftyError, match="dequantize=True"):
        model.model.layers[0].self_attn.q_proj.merge()
    merged = merge_lora(model, dequantize=True)
    assert type(merged.model.layers[0].mlp.up_proj) is nn.Linear
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    with torch.no_grad():
        assert (merged(ids) - expected).abs().max().item() <= 1e-4

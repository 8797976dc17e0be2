"""The native kernels (kernels/csrc/): the attention backward against a float32
reference, next to PyTorch's own bf16 flash backward, and inside a real model; the
per-chunk log-probs against PyTorch's ops; the decoding matmuls against a float32
reference and oneDNN's rounding. test_losses.py and test_elementwise.py run every
loss, RMSNorm, SwiGLU and RoPE test on both the native kernels and PyTorch's ops."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from thrifty.grpo.batches import group_mask, pack_groups
from thrifty.kernels import attention as attention_kernels
from thrifty.kernels.native import native_kernel, native_module
from thrifty.layers.lora import LoraConfig, apply_lora, lora_layers
from thrifty.model import fused_linear
from thrifty.model.fused_linear import FusedLinear
from thrifty.model.inference_plan import InferencePlan
from thrifty.training.losses import selective_log_probs

from native_support import cpu_has, needs_native
from tiny_models import load_ours, randomise_adapters, save_hf_model


@needs_native
def test_builds_on_a_cpu_with_avx512_bf16() -> None:
    # On such a CPU a None here means the build broke and training silently got slower.
    assert native_kernel("attention_backward") is not None
    assert native_kernel("attention_forward") is not None
    assert native_kernel("token_log_probs") is not None
    assert native_kernel("elementwise") is not None
    assert native_kernel("decode_attention") is not None
    assert native_kernel("sampling") is not None
    assert native_kernel("decode_linear") is not None
    # The matmuls take AMX where it is (unless told not to), AVX-512 BF16 elsewhere.
    amx = cpu_has("amx_bf16") and os.environ.get("THRIFTY_NATIVE_AMX") != "0"
    assert native_module().attention_uses_amx() == amx
    assert native_module().decode_linear_uses_amx() == amx


@pytest.mark.skipif(not cpu_has("amx_bf16") or os.environ.get("THRIFTY_NATIVE_AMX") == "0",
                    reason="without AMX every other test here runs the AVX-512 BF16 matmuls already")
def test_the_avx512_matmuls_on_a_cpu_with_amx() -> None:
    # vnni_gemm.h and decode_linear.cpp's VectorBlock, which AMX machines otherwise never run.
    tests = Path(__file__).parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "kernels/test_native.py"),
         str(tests / "model/test_decoding_step.py"), str(tests / "kernels/test_kernel_properties.py"),
         "-k", "builds or reference or pytorchs or decoding_step or test_kernel_properties"],
        env={**os.environ, "THRIFTY_NATIVE_AMX": "0"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def packed_mask(batch: int, length: int) -> torch.Tensor:
    """GRPO-style rows: a 40-token prompt, completions of 50 tokens that each see the
    prompt and their own past, and right padding whose queries see nothing at all."""
    positions, segments = [], []
    for row in range(batch):
        used = length - 7 * row
        seg = [0] * 40 + [1 + (i // 50) for i in range(used - 40)] + [-1] * (length - used)
        pos = list(range(40)) + [40 + i % 50 for i in range(used - 40)] + [0] * (length - used)
        positions.append(pos)
        segments.append(seg)
    positions_t, segments_t = torch.tensor(positions), torch.tensor(segments)
    mask = group_mask(positions_t, torch.where(segments_t >= 0, 0, -1), segments_t, None)
    # group_mask lets prompt tokens of segment 0 be seen by every completion; padding
    # (group and segment -1) sees only padding: make its queries see nothing to test empty rows.
    return mask & (segments_t >= 0).unsqueeze(1).unsqueeze(-1)


def grpo_mask() -> torch.Tensor:
    """Two GRPO groups as pack_groups lays them out, in one row padded to 704:
    [prompt | completion 1 | ... | prompt 2 | ...], the completions of different lengths
    (some over 128 tokens). A late completion's queries see its prompt and itself only:
    whole 64-key blocks in between are hidden, so the native kernels skip them."""
    prompts = [[1] * 38] * 4 + [[2] * 45] * 3
    lengths = [64, 150, 17, 100, 30, 200, 5]
    completions = [[3] * n for n in lengths]
    completion_mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).float()
    batch = pack_groups(prompts, completions, completion_mask, torch.zeros(len(lengths)), pad_token_id=0,
                        sliding_window=None, device=torch.device("cpu"))
    return batch.mask


def hidden_blocks_between_visible_ones(mask: torch.Tensor) -> int:
    """How many (64-query block, 64-key block) pairs are entirely masked although the
    query block sees keys further right: the blocks only the block table skips."""
    rows, _, queries, keys = mask.shape
    blocks = mask.view(rows, queries // 64, 64, keys // 64, 64).any(4).any(2)  # [rows, query blocks, key blocks]
    later_visible = blocks.flip(-1).cumsum(-1).flip(-1) > blocks.long()
    return int((~blocks & later_visible).sum())


def gradients(q, k, v, grad_out, mask, causal, native: bool):  # type: ignore[no-untyped-def]
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if native:
        out, _ = attention_kernels._FlashAttentionNativeBackward.apply(q, k, v, mask, causal, None)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    out.backward(grad_out.to(out.dtype))
    return out, (q.grad, k.grad, v.grad)


CASES = {
    # name: batch, length, query heads, kv heads, head_dim, mask (None: causal)
    "causal-gqa-512": (2, 512, 9, 3, 64, None),
    "causal-odd-length": (3, 37, 9, 3, 64, None),
    "causal-one-block": (1, 64, 4, 4, 32, None),
    "causal-two-tokens": (2, 2, 4, 2, 16, None),
    "packed-mask-padding": (3, 200, 6, 2, 64, "packed"),
    "grpo-groups": (1, 704, 9, 3, 64, "grpo"),  # batch and length: what grpo_mask() packs
    "grpo-few-heads": (1, 704, 2, 1, 64, "grpo"),  # the backward splits each head's query blocks in parts
}


def case_inputs(case: str) -> tuple[torch.Tensor, ...]:
    """q, k, v, grad_out (bf16) and the mask (None: causal) of a CASES entry."""
    batch, length, heads, kv_heads, head_dim, mask_kind = CASES[case]
    mask = {None: lambda: None, "packed": lambda: packed_mask(batch, length), "grpo": grpo_mask}[mask_kind]()
    g = torch.Generator().manual_seed(0)
    # q in [batch, seq, heads, dim] memory, viewed as [batch, heads, seq, dim], as the model does.
    q = torch.randn(batch, length, heads, head_dim, generator=g).transpose(1, 2).bfloat16()
    k = torch.randn(batch, kv_heads, length, head_dim, generator=g).bfloat16()
    v = torch.randn(batch, kv_heads, length, head_dim, generator=g).bfloat16()
    grad_out = torch.randn(batch, heads, length, head_dim, generator=g).bfloat16()
    return q, k, v, grad_out, mask


@needs_native
@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_match_a_float32_reference(case: str) -> None:
    mask_kind = CASES[case][-1]
    q, k, v, grad_out, mask = case_inputs(case)
    if mask_kind == "grpo":
        assert hidden_blocks_between_visible_ones(mask) >= 6  # blocks the native kernels skip
    causal = mask is None

    reference_out, reference = gradients(q.float(), k.float(), v.float(), grad_out.float(), mask, causal, native=False)
    out, ours = gradients(q, k, v, grad_out, mask, causal, native=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        _, torchs = gradients(q, k, v, grad_out, mask, causal, native=False)

    if mask_kind == "packed":  # fully masked query rows: no output to speak of and no gradient
        empty = ~mask.any(-1).squeeze(1)  # [batch, seq]
        assert empty.any()
        assert torch.all(ours[0].transpose(1, 2)[empty] == 0)
        keep = (~empty).unsqueeze(1).unsqueeze(-1)
        reference = (reference[0] * keep, *reference[1:])
        ours = (ours[0] * keep, *ours[1:])
        torchs = (torchs[0] * keep, *torchs[1:])
        reference_out, out = reference_out * keep, out * keep
    assert torch.allclose(out.float(), reference_out, atol=0.02)
    for name, mine, theirs, exact in zip("qkv", ours, torchs, reference):
        assert mine.dtype == torch.bfloat16 and mine.shape == exact.shape, name
        my_error = (mine.float() - exact).abs().max().item()
        torch_error = (theirs.float() - exact).abs().max().item()
        # bf16 inputs, outputs and dS: errors of a few bf16 ulps of the largest gradient.
        assert my_error <= 0.02 * exact.abs().max().item() + 1e-3, (name, my_error)
        assert my_error <= torch_error * 1.05 + 1e-3, (name, my_error, torch_error)


@needs_native
@pytest.mark.parametrize("case", ["causal-gqa-512", "causal-odd-length", "causal-two-tokens", "packed-mask-padding",
                                  "grpo-groups"])
def test_forward_matches_a_float32_reference(case: str) -> None:
    q, k, v, _, mask = case_inputs(case)
    causal = mask is None
    scale = q.shape[-1] ** -0.5
    out, logsumexp = native_kernel("attention_forward").attention_forward(q, k, v, mask, causal, scale)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and logsumexp.shape == q.shape[:3]
    assert out.transpose(1, 2).is_contiguous()  # [B, T, H, D] memory: the model's reshape is a view

    group = q.shape[1] // k.shape[1]
    scores = q.float() @ k.float().repeat_interleave(group, 1).transpose(-1, -2) * scale
    allowed = mask if mask is not None else torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    empty = scores.isinf().all(-1)  # [B, H, T]: rows that attend nothing (packed padding)
    assert empty.any() == (case == "packed-mask-padding")
    # Such rows: finite output (0) and a logsumexp that makes every probability 0.
    assert torch.isfinite(out).all() and torch.all(out[empty] == 0) and torch.all(logsumexp[empty] == float("inf"))
    expected = scores.softmax(-1).nan_to_num() @ v.float().repeat_interleave(group, 1)
    assert torch.allclose(logsumexp[~empty], scores.logsumexp(-1)[~empty], atol=1e-4)
    error = (out.float() - expected).abs().max().item()
    assert error <= 2.0**-7 * expected.abs().max().item()
    if not empty.any():  # PyTorch's SDPA (NaN on empty rows): at most as far from exact
        pytorchs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        assert error <= (pytorchs.float() - expected).abs().max().item() * 1.05 + 1e-6


@needs_native
def test_gradients_with_pytorchs_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """The native backward on PyTorch's flash forward (its fallback) agrees with it on the native one."""
    q, k, v, grad_out, mask = case_inputs("grpo-groups")
    native_out, native = gradients(q, k, v, grad_out, mask, False, native=True)
    monkeypatch.setenv("THRIFTY_NATIVE_OFF", "attention_forward")
    out, fallback = gradients(q, k, v, grad_out, mask, False, native=True)
    assert torch.allclose(out.float(), native_out.float(), atol=0.02)
    for mine, theirs in zip(native, fallback):
        assert torch.allclose(mine.float(), theirs.float(), atol=0.02 * theirs.abs().max().item())


@needs_native
@pytest.mark.parametrize("masked", [False, True])
def test_lora_gradients_of_a_bf16_model_match_pytorchs_kernel(masked: bool, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    save_hf_model("llama", tmp_path)
    model = apply_lora(load_ours(tmp_path).to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8))
    randomise_adapters(model)
    ids = torch.randint(0, 97, (3, 200), generator=torch.Generator().manual_seed(1))
    mask = packed_mask(3, 200) if masked else None
    positions = torch.arange(200).expand(3, -1)

    def lora_gradients() -> list[torch.Tensor]:
        model.zero_grad()
        model.hidden_states(ids, positions, mask).float().square().mean().backward()
        return [layer.lora_A.weight.grad.clone() for _, layer in lora_layers(model)]

    native = lora_gradients()
    calls = []
    original = attention_kernels._FlashAttentionNativeBackward.apply
    monkeypatch.setattr(attention_kernels._FlashAttentionNativeBackward, "apply",
                        lambda *args: calls.append(1) or original(*args))
    with monkeypatch.context() as patch:
        patch.setenv("THRIFTY_NATIVE_OFF", "attention_forward")  # PyTorch's forward, native backward
        native_backward = lora_gradients()
    assert len(calls) == 2  # one per layer: the model really takes the native path
    monkeypatch.setattr(attention_kernels, "_native_backward_applies", lambda q, k: False)
    pytorchs = lora_gradients()
    for both, backward, theirs in zip(native, native_backward, pytorchs):
        assert torch.allclose(backward, theirs, rtol=0.05, atol=0.02 * theirs.abs().max().item())
        # The native forward rounds differently from PyTorch's (each as close to float32
        # attention: test_forward_matches_a_float32_reference), and this tiny random
        # model amplifies bf16 rounding: both are ~50% of the largest gradient away from
        # the gradients with float32 attention, ~1-3% away from each other.
        assert torch.allclose(both, theirs, rtol=0.05, atol=0.04 * theirs.abs().max().item())


@needs_native
def test_not_used_without_gradients_or_in_float32() -> None:
    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    assert attention_kernels._native_backward_applies(q, k)
    with torch.no_grad():
        assert not attention_kernels._native_backward_applies(q, k)
    assert not attention_kernels._native_backward_applies(q.float(), k.float())
    assert not attention_kernels._native_backward_applies(q.detach(), k.detach())


@needs_native
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_log_probs_agree_with_pytorchs_ops_on_a_real_vocabulary(temperature: float,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(11)
    hidden = (torch.randn(50, 64, generator=g)).bfloat16().requires_grad_()
    weight = (torch.randn(49159, 64, generator=g) * 0.2).bfloat16()  # SmolLM2's 49152 + a ragged tail
    tokens = torch.randint(0, 49159, (50,), generator=g)
    upstream = torch.randn(50, generator=g)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        out = selective_log_probs(hidden, weight, tokens, chunk_size=16, temperature=temperature)
        return out, torch.autograd.grad((out * upstream).sum(), hidden)[0]

    native = run()
    monkeypatch.setenv("THRIFTY_NATIVE_OFF", "token_log_probs")
    pytorchs = run()
    torch.testing.assert_close(native[0], pytorchs[0], atol=2e-5, rtol=1e-5)
    # Both round d log p / d logits to bf16 before the matmul: a bf16 ulp or so apart.
    torch.testing.assert_close(native[1].float(), pytorchs[1].float(), atol=1e-3, rtol=2e-2)


@needs_native
@pytest.mark.parametrize("rows, width, sizes, ranks, bias", [
    (1, 576, [576, 192, 192], [16, 16, 16], True),  # q/k/v: each column block reads its own adapter only
    (32, 576, [1536, 1536], [16, 16], False),
    (64, 1536, [576], [16], False),
    (65, 64, [100], [8], True),  # a second row block, a partial column block
    (3, 64, [64], [80], False),  # a rank over 64
    (5, 64, [40], [3], True),    # an odd rank: the up-projection's rows padded to even
    (7, 32, [45], [0], False),   # no adapter
    (2, 75, [33], [5], True),    # an input width that is not a whole tile step (nor even)
    (9, 64, [20, 50, 30], [4, 0, 6], False),  # blocks spanning adapters; a layer without one
    (4, 64, [64, 64], [0, 8], True),  # the first layer without an adapter
])
def test_decode_linear_matches_a_float32_reference(rows: int, width: int, sizes: list[int], ranks: list[int],
                                                   bias: bool) -> None:
    module = native_kernel("decode_linear")
    g = torch.Generator().manual_seed(rows)
    out = sum(sizes)
    x = torch.randn(rows, width, generator=g).bfloat16()
    weight = (torch.randn(out, width, generator=g) * 0.05).bfloat16()
    b = torch.randn(out, generator=g).bfloat16() if bias else None
    lora_a = torch.randn(sum(ranks), width, generator=g) * 0.05
    lora_bt = torch.block_diag(*[torch.randn(rank, size, generator=g) * 0.05 for rank, size in zip(ranks, sizes)])
    lora = module.decode_lora_pack(lora_a.t().contiguous(), lora_bt, ranks, sizes) if sum(ranks) else []
    got = module.decode_linear(x, module.decode_linear_pack(weight), out, b, lora)
    expected = x.float() @ weight.float().t() + (x.float() @ lora_a.t()) @ lora_bt
    if bias:
        expected += b.float()
    assert got.shape == (rows, out) and got.dtype == torch.bfloat16
    # One rounding of a float sum: within half a bf16 ulp (2^-9 relative) plus float noise.
    assert ((got.float() - expected).abs() <= expected.abs() * 2.0**-8 + 1e-3).all()


@needs_native
@pytest.mark.parametrize("rows", [48, 100])  # the decode kernel; more rows than it takes
def test_lora_generation_matmuls_beat_onednns_rounding(rows: int, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    save_hf_model("qwen2", tmp_path)  # biased q/k/v
    model = apply_lora(load_ours(tmp_path).to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8)).eval()
    randomise_adapters(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert InferencePlan.build(model).group(attn, "qkv").native is not None  # the model's path

    generator = torch.Generator().manual_seed(3)
    for layers in ([attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.gate_proj, mlp.up_proj]):
        x = torch.randn(rows, layers[0].in_features, generator=generator).bfloat16()
        with torch.no_grad():
            reference = torch.cat([copy.deepcopy(layer).float()(x.float()) for layer in layers], dim=-1)
        native = torch.cat(FusedLinear(layers).split(x), dim=-1).float()
        with monkeypatch.context() as patch:
            patch.setenv("THRIFTY_NATIVE_OFF", "decode_linear")
            fallback = FusedLinear(layers)
            onednn = torch.cat(fallback.split(x), dim=-1).float()
            assert fallback.native is None
        native_error = (native - reference).abs().max().item()
        onednn_error = (onednn - reference).abs().max().item()
        if rows <= fused_linear.DECODE_ROWS:  # one rounding of the float sum, oneDNN's path rounds twice
            assert native_error <= onednn_error + 1e-6
            assert native_error <= 2.0**-8 * reference.abs().max().item()
        else:  # the same two roundings as oneDNN's path, over the unpacked weights
            assert native_error <= 1.5 * onednn_error + 1e-6
            assert native_error <= 2.0**-7 * reference.abs().max().item()


@needs_native
@pytest.mark.parametrize("batch, heads, kv_heads, keys, masked", [
    (32, 9, 3, 47, True), (1, 4, 4, 1, False), (5, 8, 2, 300, True),
])
def test_decode_attention_matches_a_float32_reference(batch: int, heads: int, kv_heads: int, keys: int,
                                                      masked: bool) -> None:
    g = torch.Generator().manual_seed(keys)
    q = torch.randn(batch, 1, heads, 64, generator=g).bfloat16().transpose(1, 2)  # the model's strides
    cache_k = torch.randn(batch, kv_heads, keys + 9, 64, generator=g).bfloat16()  # a longer cache
    cache_v = torch.randn(batch, kv_heads, keys + 9, 64, generator=g).bfloat16()
    k, v = cache_k[:, :, :keys], cache_v[:, :, :keys]
    mask = None
    if masked:  # left padding of a different length per row; the newest key always visible
        start = torch.randint(0, keys, (batch, 1), generator=g)
        mask = (torch.arange(keys) >= start).unsqueeze(1).unsqueeze(1)
    with torch.no_grad():
        assert attention_kernels._native_decode_applies(q, k, v)
        got = attention_kernels.scaled_dot_product_attention(q, k, v, mask, is_causal=False)
        expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                  enable_gqa=heads != kv_heads)
        pytorchs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
    assert got.shape == (batch, heads, 1, 64) and got.dtype == torch.bfloat16
    error = (got.float() - expected).abs().max().item()
    assert error <= 2.0**-7 * expected.abs().max().item()
    assert error <= (pytorchs.float() - expected).abs().max().item() + 1e-6


@needs_native
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_draws_what_pytorchs_ops_draw_from_the_same_numbers(temperature: float,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from thrifty.generation.sampling import SamplingParams, sample_next_tokens

    logits = (torch.randn(400, 49152, generator=torch.Generator().manual_seed(4)) * 3).bfloat16()
    params = SamplingParams(temperature=temperature)
    native = sample_next_tokens(logits, params, torch.Generator().manual_seed(6))
    monkeypatch.setenv("THRIFTY_NATIVE_OFF", "sampling")
    pytorchs = sample_next_tokens(logits, params, torch.Generator().manual_seed(6))
    # The same rule in float64: the first token whose running probability passes u.
    uniform = torch.rand(400, 1, generator=torch.Generator().manual_seed(6)).double()
    cdf = (logits.double() / temperature).softmax(-1).cumsum(-1)
    exact = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(-1)
    # Measured: all 400 picks equal float64's on both CPU types. Float rounding could move a
    # pick to a neighbour only when u falls within ~1e-7 of a bucket boundary (odds ~1e-4
    # for these 400 rows), so any mismatch here is a bug.
    assert torch.equal(native, exact)
    assert torch.equal(pytorchs, exact)
    assert native.unique().numel() > 300  # really sampled, not argmax

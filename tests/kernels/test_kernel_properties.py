"""Randomised property tests of every native kernel against a float64 reference.

Each kernel runs on shapes with every kind of tail (lengths, rows, columns and ranks that
are not multiples of the 16-lane vectors or the 32/64-wide blocks, a single key, rank
over 64) and on extreme values (scores far below or above 0, large activations, fully
masked rows). Tolerances follow from where the kernel rounds: a bf16 output is one
rounding of a float result (2^-9 relative), plus float accumulation noise. These tests
run on the AVX-512 BF16 path everywhere, and test_native.py re-runs them with
THRIFTY_NATIVE_AMX=0 where AMX would otherwise be taken.
"""

from __future__ import annotations

import math

import pytest
import torch

from thrifty.kernels import attention as attention_kernels
from thrifty.kernels.native import native_module

from native_support import needs_native

BF16_ROUNDING = 2.0**-8  # the largest relative error of one rounding to bf16 (7 stored mantissa bits)


def module():  # type: ignore[no-untyped-def]
    return native_module()


def seeded(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(key) % 2**31)


# --- decoding attention: one query per row over the cache ------------------------------

def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """float64 softmax(q k^T * scale) v with GQA; rows that see no key give 0."""
    group = q.shape[1] // k.shape[1]
    k64, v64 = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = q.double() @ k64.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return (scores.softmax(-1).nan_to_num() @ v64)


@needs_native
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("keys", [1, 2, 15, 16, 17, 31, 33, 47, 70, 129])
@pytest.mark.parametrize("score_shift", [0.0, -100.0, -120.0, 100.0])
def test_decode_attention(head_dim: int, keys: int, score_shift: float) -> None:
    """score_shift moves every score of a row by that much (what Qwen2's k bias does):
    softmax does not change, so neither may the output."""
    g = seeded(head_dim, keys, int(score_shift))
    batch, heads, kv_heads = 3, 6, 2
    q = torch.randn(batch, 1, heads, head_dim, generator=g).bfloat16().transpose(1, 2)
    # k = k0 + c * q-direction: adds about score_shift to each of the row's scores.
    k = torch.randn(batch, kv_heads, keys, head_dim, generator=g)
    if score_shift:
        q_dir = q.float().reshape(batch, kv_heads, heads // kv_heads, head_dim).mean(2, keepdim=True)
        q_dir = q_dir / q_dir.square().sum(-1, keepdim=True)  # q . q_dir ~ 1 for each head of the group
        k = k * 0.1 + score_shift * head_dim**0.5 * q_dir
    k, v = k.bfloat16(), (torch.randn(batch, kv_heads, keys, head_dim, generator=g) * 3).bfloat16()
    start = torch.tensor([0, keys // 2, keys - 1]).view(batch, 1, 1, 1)  # left padding; newest key visible
    mask = torch.arange(keys).view(1, 1, 1, keys) >= start
    scale = head_dim**-0.5
    for m in (None, mask):
        got = module().decode_attention(q, k, v, m, scale)
        expected = reference_attention(q, k, v, m, scale)
        assert torch.isfinite(got).all()
        error = (got.double() - expected).abs()
        # One bf16 rounding of the output plus the float softmax's error at |scores| ~ 100.
        assert (error <= expected.abs() * BF16_ROUNDING + 2e-3 * v.float().abs().max()).all(), error.max()


@needs_native
def test_decode_attention_row_that_sees_nothing_is_zero() -> None:
    q = torch.randn(2, 4, 1, 64).bfloat16()
    k, v = torch.randn(2, 2, 5, 64).bfloat16(), torch.randn(2, 2, 5, 64).bfloat16()
    mask = torch.tensor([[True] * 5, [False] * 5]).view(2, 1, 1, 5)
    got = module().decode_attention(q, k, v, mask, 0.125)
    assert torch.all(got[1] == 0) and torch.isfinite(got).all()
    assert torch.allclose(got[0].double(), reference_attention(q, k, v, mask, 0.125)[0], atol=2e-2)


# --- training attention forward and backward ----------------------------------------------

@needs_native
@pytest.mark.parametrize("length", [1, 5, 63, 65, 130])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("score_shift", [0.0, -100.0, 100.0])
def test_attention_forward_and_backward(length: int, head_dim: int, score_shift: float) -> None:
    g = seeded(length, head_dim, int(score_shift))
    batch, heads, kv_heads = 2, 4, 2
    q = torch.randn(batch, heads, length, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=g)
    if score_shift:  # every key gets the same large component along a shared direction
        direction = torch.randn(head_dim, generator=g)
        direction = direction / direction.norm()
        q = q * 0.3 + 4 * direction
        k = k * 0.3 + score_shift * head_dim**0.5 / 4 * direction
    q, k = q.bfloat16(), k.bfloat16()
    v = torch.randn(batch, kv_heads, length, head_dim, generator=g).bfloat16()
    grad_out = torch.randn(batch, heads, length, head_dim, generator=g).bfloat16()
    scale = head_dim**-0.5
    out, logsumexp = module().attention_forward(q, k, v, None, True, scale)
    assert torch.isfinite(out).all() and torch.isfinite(logsumexp).all()

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    group = heads // kv_heads
    scores = q64 @ k64.repeat_interleave(group, 1).transpose(-1, -2) * scale
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, -math.inf)
    expected = scores.softmax(-1) @ v64.repeat_interleave(group, 1)
    assert ((out.double() - expected).abs() <= expected.abs() * BF16_ROUNDING + 5e-3 * v.float().abs().max()).all()
    assert torch.allclose(logsumexp.double(), scores.logsumexp(-1), rtol=1e-5, atol=1e-3)

    # The backward through its autograd node, which sums the kernel's per-part key/value gradients.
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    native_out, _ = attention_kernels._FlashAttentionNativeBackward.apply(*inputs, None, True, None)
    assert torch.equal(native_out, out)
    native_out.backward(grad_out)
    expected.backward(grad_out.double())
    # The kernel rounds P and dS = P * (dP - delta) to bf16 before their matmuls, so each
    # gradient is off by a few bf16 ulps of the sum of the magnitudes it adds up (large
    # when big keys cancel, as with the shifted scores), not of its own value.
    with torch.no_grad():
        probs = scores.softmax(-1)
        d_p = grad_out.double() @ v64.repeat_interleave(group, 1).transpose(-1, -2)
        delta_size = (grad_out.double() * expected).abs().sum(-1, keepdim=True)  # delta = rowsum(dO * O)
        ds_size = probs * (d_p.abs() + delta_size)

        def per_kv_head(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, kv_heads, group, length, head_dim).sum(2)

        bounds = (ds_size @ k64.abs().repeat_interleave(group, 1) * scale,
                  per_kv_head(ds_size.transpose(-1, -2) @ q64.abs()) * scale,
                  per_kv_head(probs.transpose(-1, -2) @ grad_out.double().abs()))
    for name, mine, exact, bound in zip("qkv", (t.grad for t in inputs), (q64.grad, k64.grad, v64.grad), bounds):
        assert torch.isfinite(mine).all(), name
        # Measured: at most 1.3 ulps of the bound over these cases.
        assert ((mine.double() - exact).abs() <= 4 * BF16_ROUNDING * bound + 1e-4).all(), name


@needs_native
def test_attention_forward_fully_masked_rows() -> None:
    q = torch.randn(1, 2, 20, 64).bfloat16()
    k, v = torch.randn(1, 2, 20, 64).bfloat16(), torch.randn(1, 2, 20, 64).bfloat16()
    mask = torch.ones(1, 1, 20, 20, dtype=torch.bool).tril()
    mask[:, :, 13:] = False  # padding queries see nothing
    out, logsumexp = module().attention_forward(q, k, v, mask, False, 0.125)
    assert torch.all(out[:, :, 13:] == 0) and torch.isfinite(out).all()
    assert torch.all(logsumexp[:, :, 13:] == math.inf)
    expected = reference_attention(q, k, v, mask, 0.125)
    assert torch.allclose(out[:, :, :13].double(), expected[:, :, :13], atol=2e-2)


# --- log-probs of chosen tokens ----------------------------------------------------------------

@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [1, 15, 17, 100, 4099])
@pytest.mark.parametrize("offset", [0.0, -200.0, 200.0])
def test_token_log_probs(dtype: torch.dtype, vocab: int, offset: float) -> None:
    g = seeded(vocab, int(offset), dtype == torch.float32)
    rows, temperature = 7, 0.7
    logits = (torch.randn(rows, vocab, generator=g) * 10 + offset).to(dtype)
    logits[0, -1] = offset + 60  # one dominant token, in the tail
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[0] = vocab - 1
    scale = torch.randn(rows, generator=g)
    exact = torch.log_softmax(logits.double() / temperature, -1)
    # Float rounding of the scaled logits: a few ulps of the row's largest, per row.
    noise = logits.double().abs().amax(-1) / temperature * 2.0**-21 + 2.0**-20
    log_p = module().token_log_probs(logits.clone(), targets, temperature, None)
    assert ((log_p.double() - exact.gather(1, targets[:, None]).squeeze(1)).abs() <= noise).all()
    grad = logits.clone()
    module().token_log_probs(grad, targets, temperature, scale)  # d log p / d logits, in place
    onehot = torch.nn.functional.one_hot(targets, vocab).double()
    exact_grad = (onehot - exact.exp()) * scale[:, None].double()
    rounding = 2.0**-20 if dtype == torch.float32 else BF16_ROUNDING  # the gradient's own dtype
    bound = exact_grad.abs() * rounding + (scale.double().abs() * noise)[:, None]
    assert ((grad.double() - exact_grad).abs() <= bound).all()


# --- RMSNorm, SwiGLU, RoPE ---------------------------------------------------------------------------

@needs_native
@pytest.mark.parametrize("width", [1, 15, 17, 64, 100, 576])
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e4])
def test_rms_norm_forward_and_backward(width: int, magnitude: float) -> None:
    g = seeded(width, int(magnitude * 1000))
    x = (torch.randn(9, width, generator=g) * magnitude).bfloat16()
    weight = torch.randn(width, generator=g).bfloat16()
    grad = torch.randn(9, width, generator=g).bfloat16()
    eps = 1e-5
    out, rstd = module().rms_norm_forward(x, weight, eps)
    x64 = x.double().requires_grad_()
    rstd64 = (x64.square().mean(-1, keepdim=True) + eps).rsqrt()
    # The kernel rounds the normalised x to bf16 before the weight (as the PyTorch ops do).
    normed = x64 * rstd64
    expected = weight.double() * normed
    assert torch.allclose(rstd.double(), rstd64.squeeze(-1).detach(), rtol=1e-5)
    assert ((out.double() - expected).abs() <= expected.abs() * 2 * BF16_ROUNDING + 1e-30).all()
    expected.backward(grad.double())
    grad_x = module().rms_norm_backward(grad, x, weight, rstd)
    # grad_x = rstd * (w g - x rstd^2 mean(w g x)): a few roundings of each term's size.
    with torch.no_grad():
        wg = (weight.double() * grad.double()).abs()
        size = rstd64 * (wg + x64.abs() * rstd64.square() * (wg * x64.abs()).mean(-1, keepdim=True))
    assert ((grad_x.double() - x64.grad).abs() <= 4 * BF16_ROUNDING * size).all()


@needs_native
@pytest.mark.parametrize("width", [1, 15, 17, 1536])
@pytest.mark.parametrize("magnitude", [1.0, 100.0])
def test_swiglu_forward_and_backward(width: int, magnitude: float) -> None:
    g = seeded(width, int(magnitude))
    gate = (torch.randn(5, width, generator=g) * magnitude).bfloat16()
    up = (torch.randn(5, width, generator=g) * magnitude).bfloat16()
    grad = torch.randn(5, width, generator=g).bfloat16()
    out = module().swiglu_forward(gate, up)
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    expected = torch.nn.functional.silu(g64) * u64
    assert torch.isfinite(out).all()
    # silu rounded to bf16, then the product rounded: two roundings.
    assert ((out.double() - expected).abs() <= expected.abs() * 2 * BF16_ROUNDING + 1e-30).all()
    expected.backward(grad.double())
    grad_gate, grad_up = module().swiglu_backward(grad, gate, up)
    for mine, exact in ((grad_gate, g64.grad), (grad_up, u64.grad)):
        assert torch.isfinite(mine).all()
        assert ((mine.double() - exact).abs() <= exact.abs() * 3 * BF16_ROUNDING + 1e-3 * exact.abs().max()).all()


@needs_native
@pytest.mark.parametrize("head_dim", [2, 16, 24, 64, 128])
@pytest.mark.parametrize("length", [1, 17])
def test_rope_forward_and_backward(head_dim: int, length: int) -> None:
    g = seeded(head_dim, length)
    x = torch.randn(2, 3, length, head_dim, generator=g).bfloat16()
    angles = torch.rand(1, 1, length, head_dim // 2, generator=g) * 100
    cos = torch.cat([angles.cos()] * 2, -1).bfloat16()
    sin = torch.cat([angles.sin()] * 2, -1).bfloat16()

    def rotate(t: torch.Tensor) -> torch.Tensor:
        half = t.shape[-1] // 2
        return torch.cat([-t[..., half:], t[..., :half]], -1)

    expected = x.double() * cos.double() + rotate(x.double()) * sin.double()
    out = module().rope_forward(x, cos, sin)
    assert ((out.double() - expected).abs() <= expected.abs() * 2 * BF16_ROUNDING + 1e-2).all()
    # Backward is the rotation by -angle: x = out * cos - rotate(out) * sin applied to a gradient.
    grad = torch.randn_like(x.float(), dtype=torch.float32).bfloat16()
    exact_grad = grad.double() * cos.double() - rotate(grad.double() * sin.double())
    got = module().rope_backward(grad, cos, sin)
    assert ((got.double() - exact_grad).abs() <= exact_grad.abs() * 2 * BF16_ROUNDING + 1e-2).all()


# --- sampling ------------------------------------------------------------------------------------------

@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [1, 15, 17, 1000])
@pytest.mark.parametrize("offset", [0.0, -150.0, 150.0])
def test_sampling_draws_the_inverse_cdf_token(dtype: torch.dtype, vocab: int, offset: float) -> None:
    g = seeded(vocab, int(offset), dtype == torch.float32)
    rows = 64
    logits = (torch.randn(rows, vocab, generator=g) * 2 + offset).to(dtype)
    uniform = torch.rand(rows, generator=g)
    got = module().sample_tokens(logits, uniform, 0.8)
    cdf = (logits.double() / 0.8).softmax(-1).cumsum(-1)
    exact = torch.searchsorted(cdf, (uniform.double() * cdf[:, -1])[:, None], right=True).squeeze(-1).clamp(max=vocab - 1)
    assert ((got >= 0) & (got < vocab)).all()
    # A pick may move to a neighbour only where float rounding sits on a bucket boundary.
    assert (got == exact).float().mean() >= 0.95
    assert (got - exact).abs().max() <= 1


# --- decoding matmul (+ LoRA) ----------------------------------------------------------------------------

@needs_native
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("width, sizes, ranks", [
    (16, [1], [1]), (70, [31, 33], [65, 3]), (128, [200], [128]), (34, [17, 15, 64], [0, 7, 2]),
])
@pytest.mark.parametrize("magnitude", [1.0, 300.0])
def test_decode_linear(rows: int, width: int, sizes: list[int], ranks: list[int], magnitude: float) -> None:
    g = seeded(rows, width, sum(sizes), sum(ranks), int(magnitude))
    out = sum(sizes)
    x = (torch.randn(rows, width, generator=g) * magnitude).bfloat16()
    weight = (torch.randn(out, width, generator=g) * 0.05).bfloat16()
    bias = torch.randn(out, generator=g).bfloat16()
    lora_a = torch.randn(sum(ranks), width, generator=g) * 0.05
    lora_bt = torch.block_diag(*[torch.randn(r, s, generator=g) * 0.05 for r, s in zip(ranks, sizes)])
    lora = module().decode_lora_pack(lora_a.t().contiguous(), lora_bt, ranks, sizes) if sum(ranks) else []
    got = module().decode_linear(x, module().decode_linear_pack(weight), out, bias, lora)
    expected = x.double() @ weight.double().t() + (x.double() @ lora_a.double().t()) @ lora_bt.double()
    expected += bias.double()
    # The LoRA operands split float into bf16 hi + lo parts: ~2^-16 relative of the branch.
    noise = 1e-4 * (x.double().abs() @ (weight.double().abs().t() + 0.05 * width * 0.05))
    assert ((got.double() - expected).abs() <= expected.abs() * BF16_ROUNDING + noise + 1e-3).all()

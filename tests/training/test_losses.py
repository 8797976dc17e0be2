"""Chunked cross-entropy and selective log-probs against plain PyTorch on full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from thrifty.errors import ThriftyError
from thrifty.kernels.native import native_kernel
from thrifty.training.losses import chunked_cross_entropy, selective_log_probs

N, H, V = 37, 24, 101  # N is prime, so most chunk sizes leave a ragged last chunk; V % 16 != 0


@pytest.fixture(autouse=True, params=["native", "pytorch"])
def log_prob_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with the C++ per-chunk kernel (kernels/csrc/token_log_probs.cpp) and
    with the PyTorch ops used where it cannot run (CUDA, CPUs without AVX-512 BF16)."""
    if request.param == "pytorch":
        monkeypatch.setenv("THRIFTY_NATIVE_OFF", "token_log_probs")
    elif native_kernel("token_log_probs") is None:
        pytest.skip("no native kernels on this machine: the PyTorch variant covers it")
    return request.param


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = -100
    labels[:4] = -100
    return hidden, weight, labels


def _grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 36, 37, 1000])
def test_chunked_cross_entropy_matches_full_logits(chunk_size: int) -> None:
    hidden, weight, labels = _inputs()
    loss_sum, num_tokens = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk_size)
    reference = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)
    assert num_tokens.item() == (labels != -100).sum().item()
    assert loss_sum.dtype == torch.float32
    torch.testing.assert_close(loss_sum / num_tokens, reference, atol=1e-5, rtol=1e-5)
    ours = _grads(loss_sum / num_tokens, hidden, weight)
    theirs = _grads(reference, hidden, weight)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert ours[0][labels == -100].abs().max() == 0  # unlabelled rows get no gradient


def test_chunked_cross_entropy_frozen_weight_and_batched_shape() -> None:
    hidden, weight, labels = _inputs(1)
    weight = weight.detach()  # a frozen lm_head, as in LoRA
    hidden3 = hidden.view(1, N, H)  # [B, T, H] input is flattened internally
    loss_sum, n = chunked_cross_entropy(hidden3, weight, labels.view(1, N), chunk_size=8)
    loss_sum.backward()
    reference = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    torch.testing.assert_close(loss_sum, reference, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(hidden.grad, _grads(reference, hidden)[0], atol=1e-5, rtol=1e-5)
    assert weight.grad is None


def test_chunked_cross_entropy_all_ignored_is_zero_with_zero_grads() -> None:
    hidden, weight, _ = _inputs(2)
    loss_sum, n = chunked_cross_entropy(hidden, weight, torch.full((N,), -100), chunk_size=8)
    loss_sum.backward()
    assert loss_sum.item() == 0 and n.item() == 0
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


@pytest.mark.parametrize("frozen_head", [False, True])
def test_chunked_cross_entropy_bf16(frozen_head: bool) -> None:
    hidden, weight, labels = _inputs(3, torch.bfloat16)
    weight.requires_grad_(not frozen_head)
    trained = [t for t in (hidden, weight) if t.requires_grad]
    loss_sum, n = chunked_cross_entropy(hidden, weight, labels, chunk_size=10)
    grads = _grads(loss_sum / n, *trained)
    assert loss_sum.dtype == torch.float32 and [g.dtype for g in grads] == [torch.bfloat16] * len(trained)
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_(not frozen_head)
    reference = F.cross_entropy(h32 @ w32.T, labels)
    torch.testing.assert_close(loss_sum / n, reference, atol=2e-2, rtol=1e-2)
    for ours, theirs in zip(grads, _grads(reference, *[t for t in (h32, w32) if t.requires_grad])):
        torch.testing.assert_close(ours.float(), theirs, atol=2e-3, rtol=5e-2)


@pytest.mark.parametrize("frozen_head", [False, True])
def test_full_logits_are_never_saved_for_backward(frozen_head: bool) -> None:
    hidden = torch.randn(400, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=not frozen_head)
    labels = torch.randint(0, V, (400,))
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum, _ = chunked_cross_entropy(hidden, weight, labels, chunk_size=8)
    loss_sum.backward()
    # Only hidden [400, H], weight [V, H] and per-row statistics: nothing near [400, V].
    assert saved and max(saved) <= 400 * H


def test_out_of_vocabulary_label_is_a_clear_error() -> None:
    hidden, weight, labels = _inputs(5)
    labels[-1] = V + 3
    with pytest.raises(ThriftyError, match=f"token id {V + 3}.*vocabulary of {V}"):
        chunked_cross_entropy(hidden, weight, labels)


@pytest.mark.parametrize("frozen_head", [False, True])  # recomputed in backward / row grads from the forward
@pytest.mark.parametrize("chunk_size,temperature", [(1, 1.0), (7, 1.0), (37, 0.7), (64, 1.3)])
def test_selective_log_probs_match_log_softmax(chunk_size: int, temperature: float, frozen_head: bool) -> None:
    hidden, weight, _ = _inputs(6)
    if frozen_head:
        weight = weight.detach()
    tokens = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(9))
    ours = selective_log_probs(hidden, weight, tokens, chunk_size=chunk_size, temperature=temperature)
    reference = torch.log_softmax(hidden @ weight.T / temperature, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    # A non-uniform upstream gradient, as GRPO's per-token advantages give.
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(10))
    trained = [t for t in (hidden, weight) if t.requires_grad]
    for a, b in zip(_grads((ours * upstream).sum(), *trained), _grads((reference * upstream).sum(), *trained)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_selective_log_probs_keep_the_batch_shape() -> None:
    hidden, weight, _ = _inputs(7)
    tokens = torch.randint(0, V, (N,))
    out = selective_log_probs(hidden[:36].reshape(4, 9, H), weight.detach(), tokens[:36].view(4, 9), chunk_size=5)
    assert out.shape == (4, 9)
    out.sum().backward()
    assert hidden.grad is not None



@pytest.mark.parametrize("chunk_size", [7, 64])
def test_a_head_in_gguf_blocks_is_its_dequantized_weight(chunk_size: int) -> None:
    """QLoRA on a GGUF file keeps the head in the file's blocks: the loss multiplies by
    them (forward and input gradient) and must give what the same weight, dequantized
    and frozen, gives. A head product that skipped a panel, or a hidden gradient taken
    from the wrong product, fails the comparison."""
    import gguf

    from thrifty.layers.gguf_quant import GGUFLinear

    width, vocab = 64, 101
    g = torch.Generator().manual_seed(11)
    values = (torch.randn(vocab, width, generator=g) * 0.3).numpy()
    blocks = torch.from_numpy(gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0))
    head = GGUFLinear(blocks, int(gguf.GGMLQuantizationType.Q8_0), width, None, torch.float32)
    dense = head.dequantize(torch.float32)
    hidden = torch.randn(N, width, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (N,), generator=g)
    labels[::4] = -100
    ours, count = chunked_cross_entropy(hidden, head, labels, chunk_size=chunk_size)
    reference, reference_count = chunked_cross_entropy(hidden, dense, labels, chunk_size=chunk_size)
    assert count == reference_count
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_grads(ours, hidden)[0], _grads(reference, hidden)[0], atol=1e-6, rtol=1e-5)
    tokens = labels.clamp(min=0)
    with torch.no_grad():  # GRPO's old log-probs: no gradient, the same values
        torch.testing.assert_close(selective_log_probs(hidden, head, tokens, chunk_size=chunk_size, temperature=0.7),
                                   selective_log_probs(hidden, dense, tokens, chunk_size=chunk_size, temperature=0.7))

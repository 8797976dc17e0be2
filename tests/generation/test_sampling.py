"""Sampling filters against transformers' logits processors, by drawing many samples."""

from __future__ import annotations

import pytest
import torch

from thrifty.errors import ThriftyError
from thrifty.generation.sampling import TOP_P_CANDIDATES, SamplingParams, sample_next_tokens
from thrifty.kernels.native import native_kernel


def use_kernel(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The C++ whole-vocabulary sampler (kernels/csrc/sampling.cpp), or the PyTorch ops
    that run where it cannot (any top-k, top-p or min-p, or no native kernels)."""
    if kernel == "pytorch":
        monkeypatch.setenv("THRIFTY_NATIVE_OFF", "sampling")
    elif native_kernel("sampling") is None:
        pytest.skip("no native kernels on this machine: the PyTorch variant covers it")


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution transformers samples from with the same settings."""
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(p.temperature)])
    if p.top_k:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        warpers.append(MinPLogitsWarper(p.min_p))
    return warpers(None, logits.clone()).softmax(-1)


def empirical(logits: torch.Tensor, p: SamplingParams, draws: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    rows = logits.expand(draws, -1)
    picks = sample_next_tokens(rows, p, generator)
    return torch.bincount(picks, minlength=logits.shape[-1]).float() / draws


SETTINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=1.3, top_k=12, top_p=0.9),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.9, top_p=0.95, min_p=0.05),
]


# The native sampler takes the temperature-only settings; every setting runs on PyTorch's ops.
CASES = [(p, "native") for p in SETTINGS if not (p.top_k or p.top_p < 1 or p.min_p)] + [(p, "pytorch") for p in SETTINGS]


@pytest.mark.parametrize(("params", "kernel"), CASES, ids=str)
def test_sampled_frequencies_match_transformers(params: SamplingParams, kernel: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    use_kernel(kernel, monkeypatch)
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(1)) * 2
    from thrifty.generation.sampling import _native_whole_vocabulary_sampler

    assert (_native_whole_vocabulary_sampler(logits, params) is not None) == (kernel == "native")
    expected = reference_probs(logits, params)[0]
    got = empirical(logits, params, draws=40_000)
    # Same support exactly, and frequencies within sampling noise.
    assert set(got.nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())
    assert (got - expected).abs().max().item() < 0.015


def test_wide_nucleus_falls_back_to_exact_sort() -> None:
    """A flat distribution over more tokens than the top-p shortlist still samples right."""
    vocab = TOP_P_CANDIDATES * 4
    # A few likely tokens, then a long, slowly falling tail (no ties, so the nucleus
    # boundary is well defined).
    logits = -torch.arange(vocab, dtype=torch.float32).unsqueeze(0) * 1e-3
    logits[0, :10] = 3.0
    params = SamplingParams(temperature=1.0, top_p=0.9)
    expected = reference_probs(logits, params)[0]
    assert (expected > 0).sum() > TOP_P_CANDIDATES
    got = empirical(logits, params, draws=60_000)
    assert set(got.nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())
    assert abs(got[:10].sum().item() - expected[:10].sum().item()) < 0.01
    assert abs(got[10:].sum().item() - expected[10:].sum().item()) < 0.01


def test_greedy_is_argmax_and_seeded_sampling_repeats() -> None:
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample_next_tokens(logits, SamplingParams(), None), logits.argmax(-1))
    params = SamplingParams(temperature=1.0, top_p=0.9)
    a = sample_next_tokens(logits, params, torch.Generator().manual_seed(5))
    b = sample_next_tokens(logits, params, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5),
                                          ("top_k", -3), ("min_p", 1.0)])
def test_invalid_settings_name_the_option(field: str, value: float) -> None:
    with pytest.raises(ThriftyError, match=field):
        SamplingParams(**{field: value})


def test_row_streams_do_not_depend_on_the_batch() -> None:
    """With one seed per row (RowGenerators), a row samples the same tokens alone or beside
    others, and whether or not other rows finish first: what lets torchrun ranks sample
    parts of a GRPO batch as one process samples all of it."""
    from pathlib import Path
    import tempfile

    from thrifty.formats.loader import load_model
    from thrifty.generation.engine import generate_tokens
    from tiny_tokenizer import save_tiny_model_dir

    with tempfile.TemporaryDirectory() as directory:
        save_tiny_model_dir("llama", Path(directory))
        model, tokenizer = load_model(directory, dtype="float32", device="cpu")
    a, b = tokenizer.encode("say red sun"), tokenizer.encode("say two moon")  # 11 and 12 tokens: padded
    options = dict(max_new_tokens=12, sampling=SamplingParams(temperature=1.0), num_return_sequences=3,
                   stop_token_ids=tokenizer.stop_token_ids, pad_token_id=tokenizer.pad_token_id)
    together, _ = generate_tokens(model, [a, b], row_seeds=[11, 12, 13, 21, 22, 23], **options)
    alone, _ = generate_tokens(model, [b], row_seeds=[21, 22, 23], **options)
    reordered, _ = generate_tokens(model, [b, a], row_seeds=[21, 22, 23, 11, 12, 13], **options)
    assert together[3:] == alone == reordered[:3] and together[:3] == reordered[3:]
    assert len({tuple(t) for t in together}) == 6  # really sampled, six different streams

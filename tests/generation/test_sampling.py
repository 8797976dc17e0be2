"""Sampling filters against transformers' logits processors, by drawing many samples."""

from __future__ import annotations

import pytest
import torch

from thrifty.errors import ThriftyError
from thrifty.generation.sampling import TOP_P_CANDIDATES, SamplingParams, sample_next_tokens
from thrifty.kernels.native import native_kernel


@pytest.fixture(autouse=True, params=["native", "pytorch"])
def sampling_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with the C++ whole-vocabulary sampler (kernels/csrc/sampling.cpp) and
    with the PyTorch ops used where it cannot run."""
    if request.param == "pytorch":
        monkeypatch.setenv("THRIFTY_NATIVE_OFF", "sampling")
    elif native_kernel("sampling") is None:
        pytest.skip("no native kernels on this machine: the PyTorch variant covers it")
    return request.param


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


@pytest.mark.parametrize("params", SETTINGS, ids=str)
def test_sampled_frequencies_match_transformers(params: SamplingParams) -> None:
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(1)) * 2
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

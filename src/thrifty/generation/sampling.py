"""Choosing the next token from logits: greedy, or temperature / top-k / top-p / min-p."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from thrifty.errors import ThriftyError
from thrifty.kernels.native import native_kernel


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    min_p: float = 0.0  # 0 disables

    def __post_init__(self) -> None:
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0 (0 means greedy)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "must be in [0, 1)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ThriftyError(f"sampling option {name}={getattr(self, name)} {rule}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# Nucleus sampling first looks among this many most likely tokens; only rows whose
# nucleus is wider fall back to sorting the whole vocabulary.
TOP_P_CANDIDATES = 256


def sample_next_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row of `logits` [batch, vocab]; returns [batch] token ids.

    Each row's choice uses one uniform number in [0, 1): `uniform` [batch] if given (see
    RowGenerators), else drawn from `generator`.

    Filters run in Hugging Face's order (temperature, top-k, top-p, min-p) so the same
    settings mean the same distribution. Everything after top-k/top-p works on a short,
    sorted candidate list instead of the whole 50k-150k vocabulary: a full sort and a
    random number per vocabulary entry cost more than the model's matmuls at small batch.
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    if uniform is None:
        uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    native = _native_whole_vocabulary_sampler(logits, params)
    if native is not None:
        return native.sample_tokens(logits, uniform, params.temperature)
    # A full pass over [batch, vocab]: skipped when it would change nothing.
    logits = logits.float() / params.temperature if params.temperature != 1.0 else logits.float()
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        top_logits, candidates = logits.topk(params.top_k, dim=-1)
        probs = top_logits.softmax(dim=-1)
    else:
        probs = logits.softmax(dim=-1)
        candidates = None
        if params.top_p < 1.0:
            probs, candidates = nucleus_candidates(probs, params.top_p)
    if params.top_p < 1.0:
        # probs are sorted in descending order here: keep the smallest prefix whose
        # mass reaches top_p (a token stays if the mass before it is below top_p).
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= params.top_p, 0.0)
    if params.min_p > 0.0:
        floor = params.min_p * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < floor, 0.0)
    chosen = sample_from_weights(probs, uniform)
    if candidates is not None:
        chosen = candidates.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    return chosen


def _native_whole_vocabulary_sampler(logits: torch.Tensor, params: SamplingParams) -> ModuleType | None:
    """kernels/csrc/sampling.cpp's module when only a temperature applies: one fused pass per row
    (max, exp, inverse-CDF scan) instead of a float copy, softmax, cumsum and search."""
    temperature_only = not (0 < params.top_k < logits.shape[-1]) and params.top_p >= 1.0 and params.min_p == 0.0
    if not temperature_only or logits.device.type != "cpu" or logits.stride(-1) != 1:
        return None
    if logits.dtype not in (torch.float32, torch.bfloat16):
        return None
    return native_kernel("sampling")


def nucleus_candidates(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely tokens of each row, sorted, enough to hold top_p of the mass.

    Usually the top TOP_P_CANDIDATES suffice; if any row's nucleus is wider, sort the
    whole vocabulary so the result stays exact.
    """
    k = min(TOP_P_CANDIDATES, probs.shape[-1])
    top_probs, candidates = probs.topk(k, dim=-1)
    if k < probs.shape[-1] and bool((top_probs.sum(dim=-1) < top_p).any()):
        return probs.sort(dim=-1, descending=True)
    return top_probs, candidates


def sample_from_weights(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One index per row, drawn with probability proportional to `weights` [batch, n],
    by inverse CDF at the row's `uniform` [batch] number: cheaper than torch.multinomial,
    which spends ~15 ms per step over a 49k vocabulary at batch 16 on our CPU."""
    cdf = weights.cumsum(dim=-1)
    u = uniform.to(cdf.dtype).unsqueeze(-1)
    chosen = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    return chosen.clamp_(max=weights.shape[-1] - 1)


class RowGenerators:
    """A random stream per output row, seeded by the caller: a row's tokens then depend on
    its own seed alone, not on which other rows share its batch or when they finish. GRPO
    seeds each completion by (seed, generation, prompt position, sample), so a torchrun
    rank sampling part of a batch draws what one process sampling all of it draws."""

    def __init__(self, seeds: list[int], device: torch.device) -> None:
        self.device = device
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def uniform(self, rows: list[int]) -> torch.Tensor:
        """The next number of each of `rows`' streams, [len(rows)]."""
        return torch.cat([torch.rand(1, generator=self.generators[r], device=self.device) for r in rows])

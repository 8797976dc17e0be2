"""The pure tensor parts of GRPO: rewards -> advantages -> clipped surrogate loss.

Everything here follows TRL 1.16's GRPOTrainer line by line (`_calculate_rewards`,
the "sum_then_normalize" branch of `_generate_and_score_completions`, `_compute_loss`),
so a user moving from TRL gets the same numbers for the same config. The trainer owns
the loop; these functions know nothing of models, ranks or optimizers: whatever depends
on them (gradient accumulation, world size) comes in as an argument.

Shapes: rewards and advantages come in groups, [groups, G] (G completions per prompt,
`num_generations`), as the trainer's Group records hold them, so nothing re-groups a flat
list; the loss runs on micro-batches of B completions and T completion tokens (right-padded).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import torch

from thrifty.errors import ThriftyError
from thrifty.grpo.config import LOSS_TYPES, SCALE_REWARDS

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ScaleRewards = Literal["group", "batch", "none"]

# TRL adds this to the std before dividing, so a group whose rewards are all equal gets
# zero advantages instead of 0/0.
ADVANTAGE_EPS = 1e-4


# --------------------------------------------------------------------------- rewards


def combine_rewards(per_function: torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum of the reward functions' outputs, one reward per completion.

    per_function: [num_funcs, ...] (e.g. [num_funcs, groups, G]), NaN where a function
    returned None ("does not apply"); the result has the shape after num_funcs.
    As TRL: NaNs are skipped (nansum), and a completion that *every* function skipped is
    unscorable and stays NaN, so `group_advantages` leaves it out of its group's baseline
    and gives it a zero advantage (nansum alone would make it a spurious 0 reward).
    """
    per_function = _per_function(per_function)
    w = _weights(weights, per_function.shape[0], per_function.device)
    rewards = (per_function * w.view(-1, *[1] * (per_function.dim() - 1))).nansum(dim=0)
    rewards[torch.isnan(per_function).all(dim=0)] = math.nan
    return rewards


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased (Bessel-corrected) std ignoring NaNs; NaN where fewer than two values. TRL's `nanstd`."""
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    var = torch.nanmean((x - mean) ** 2, dim=dim) if dim is not None else torch.nanmean((x - mean) ** 2)
    count = (~torch.isnan(x)).sum(dim=dim) if dim is not None else (~torch.isnan(x)).sum()
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(var, math.nan))
    return torch.sqrt(var * correction)


def group_advantages(rewards: torch.Tensor, scale_rewards: ScaleRewards | bool = "group") -> torch.Tensor:
    """Advantage of each completion: its reward minus its group's mean, optionally scaled.

    rewards: [groups, G] combined rewards of the *whole* generation batch (all ranks: groups
    must be complete), NaN for unscorable completions; the advantages have its shape. scale_rewards:
    "group" (or True) divides by each group's std + 1e-4; "batch" by the std of all rewards
    + 1e-4 (PPO-Lite); "none" (or False) not at all (Dr. GRPO). Stds are unbiased, as TRL's.
    Unscorable completions, and groups with fewer than two scorable ones, get advantage 0.
    """
    scale = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)  # type: ignore[call-overload]
    if scale not in SCALE_REWARDS:
        raise ThriftyError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}; got {scale_rewards!r}.")
    grouped = _grouped(rewards)
    advantages = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale == "group":
        std = nanstd(grouped, dim=1)[:, None] if grouped.shape[1] > 1 else torch.zeros_like(advantages)
        advantages = advantages / (std + ADVANTAGE_EPS)
    elif scale == "batch":
        std = nanstd(grouped).expand_as(advantages) if grouped.numel() > 1 else torch.zeros_like(advantages)
        advantages = advantages / (std + ADVANTAGE_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def reward_metrics(per_function: torch.Tensor, names: Sequence[str],
                   weights: Sequence[float] | torch.Tensor | None = None) -> dict[str, float]:
    """TRL's reward log lines: rewards/<name>/mean|std per function (over the completions it
    scored), reward and reward_std (combined, scorable completions), frac_reward_zero_std.
    per_function: [num_funcs, groups, G].

    Deviation: TRL's frac_reward_zero_std with scale_rewards="batch" tests the batch std; here
    it is always the fraction of groups whose rewards are all equal (no learning signal),
    which is the number a user tuning a task needs.
    """
    per_function = _per_function(per_function)
    if len(names) != per_function.shape[0] or per_function.dim() != 3:
        raise ValueError(f"{len(names)} names for rewards of shape {tuple(per_function.shape)}; expected "
                         "[num_funcs, groups, G].")
    metrics: dict[str, float] = {}
    for name, row in zip(names, per_function):
        metrics[f"rewards/{name}/mean"] = torch.nanmean(row).item()
        metrics[f"rewards/{name}/std"] = nanstd(row.flatten()).item()
    rewards = combine_rewards(per_function, weights)
    metrics["reward"] = torch.nanmean(rewards).item()
    metrics["reward_std"] = nanstd(rewards.flatten()).item()
    group_std = nanstd(rewards, dim=1) if rewards.shape[1] > 1 else torch.zeros(rewards.shape[0])
    # NaN std (fewer than two scorable completions) counts as zero: no signal either way.
    metrics["frac_reward_zero_std"] = torch.isclose(torch.nan_to_num(group_std, nan=0.0),
                                                    torch.zeros_like(group_std)).float().mean().item()
    return metrics


# --------------------------------------------------------------------------- loss


def completion_mask(lengths: torch.Tensor, max_length: int, truncated: torch.Tensor | None = None,
                    mask_truncated_completions: bool = False) -> torch.Tensor:
    """[B, max_length] float mask: 1 on each completion's real tokens, 0 on right padding,
    and (with mask_truncated_completions) 0 on every token of a completion that hit the
    length limit without EOS, so it neither gets rewarded nor penalised (DAPO)."""
    positions = torch.arange(max_length, device=lengths.device)
    mask = (positions[None, :] < lengths[:, None]).float()
    if mask_truncated_completions:
        if truncated is None:
            raise ValueError("mask_truncated_completions needs the `truncated` flags.")
        mask = mask * (~truncated.bool()).float()[:, None]
    return mask


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: LossType = "dapo",
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    gradient_accumulation_steps: int = 1,
    num_sequences: int | None = None,
    num_tokens: float | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-surrogate GRPO loss of one micro-batch, ready for `.backward()`, and its metrics.

    logp: [B, T] log-probs of the sampled completion tokens under the current policy (with
    grad); old_logp: the same under the policy that sampled them (no grad), or None when
    num_iterations == 1 and the batch is used right after sampling: then old = logp.detach()
    and the ratio is 1 with the right gradient. ref_logp: under the reference model, needed
    iff beta != 0. advantages: [B]. mask: [B, T], 0 on padding (and masked truncations).

    Per token: ratio = exp(logp - old_logp); loss = -min(ratio * A, clip(ratio, 1-eps,
    1+eps_high) * A) (with `delta`, ratio is also capped at delta: two-sided clipping)
    [times importance_sampling_ratio, [B, T] or [B, 1], when the completions were sampled
    by other weights: rollout_importance_ratio] + beta * (exp(ref - logp) - (ref - logp) - 1)
    (the k3 KL estimator). Aggregation:
      grpo:    mean over each sequence's tokens, then mean over sequences;
      bnpo:    sum over the micro-batch's tokens / their number;
      dr_grpo: sum / (B * max_completion_length);
      dapo:    sum / num_items_in_batch.
    grpo, bnpo and dr_grpo are divided by gradient_accumulation_steps (as TRL does: the
    micro-batch losses of one optimizer step are summed by backward). dapo is not: its
    num_items_in_batch must already be the number of loss tokens in the *whole* optimizer
    step (all micro-batches), averaged over ranks (TRL: tokens of all ranks / world size,
    since DDP then averages gradients), which makes the step's gradient the true per-token
    mean. It defaults to this micro-batch's token count (right for one micro-batch, one rank).

    Under torchrun a rank holds a slice of the micro-batch: num_sequences (grpo, dr_grpo)
    and num_tokens (bnpo) are then the whole micro-batch's completions and loss tokens,
    all ranks together, so the ranks' losses add up to the loss of the whole micro-batch
    (defaults: this slice's own, right for one rank).

    Metrics (this micro-batch; the trainer averages across steps/ranks): policy_loss (before
    the accumulation division; for dapo, times gradient_accumulation_steps, so the mean over
    a step's micro-batches is the step's loss), kl (masked mean; only when beta != 0), clip_ratio/low_mean,
    high_mean, region_mean (fraction of tokens whose gradient the clip removed), low_min,
    high_max (extremes of the per-sequence fractions), num_tokens.
    """
    if loss_type not in LOSS_TYPES:
        raise ThriftyError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}.")
    if logp.dim() != 2 or mask.shape != logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and mask {tuple(mask.shape)} must both be [B, T].")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [B] = [{logp.shape[0]}].")
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs the reference model's log-probs (ref_logp).")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ThriftyError("loss_type 'dr_grpo' divides by max_completion_length: set it (e.g. 256).")
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)[:, None]

    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if importance_sampling_ratio is not None:
        per_token = per_token * importance_sampling_ratio
    if beta != 0.0:
        assert ref_logp is not None
        diff = ref_logp - logp
        per_token_kl = torch.exp(diff) - diff - 1
        per_token = per_token + beta * per_token_kl

    masked = per_token * mask
    sequences = logp.shape[0] if num_sequences is None else num_sequences
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / sequences
    elif loss_type == "bnpo":
        tokens = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=logp.dtype)
        loss = masked.sum() / tokens.clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (sequences * max_completion_length)  # type: ignore[operator]
    else:  # dapo
        items = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=logp.dtype)
        loss = masked.sum() / items.clamp(min=1.0)
    policy_loss = loss.detach()
    if loss_type != "dapo":
        loss = loss / gradient_accumulation_steps
    else:
        # This micro-batch's share of the step's loss; times the micro-batches of the step,
        # their mean (what the trainer logs) is the step's loss, however it is split.
        policy_loss = policy_loss * gradient_accumulation_steps

    with torch.no_grad():
        metrics = _loss_metrics(ratio.detach(), adv, mask, eps_low, eps_high)
        metrics["policy_loss"] = policy_loss.item()
        if beta != 0.0:
            metrics["kl"] = _masked_mean(per_token_kl.detach(), mask)
    return loss, metrics


def rollout_importance_ratio(old_logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor, *,
                             mode: str = "sequence_mask", clip_min: float | None = None,
                             clip_max: float | None = 3.0) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's vLLM importance-sampling correction, for completions sampled by other weights
    than the ones trained (GRPO's rollout_quantization): the ratio pi_train / pi_sampler
    that grpo_loss multiplies each token's loss by, and its metrics under TRL's names.

    old_logp: [B, T] the trained weights' log-probs of the sampled tokens (no grad);
    sampling_logp: the sampler's (NaN where unknown: no correction there). token_* modes:
    a ratio per token [B, T]; sequence_* modes: the product over the sequence's tokens
    [B, 1]. *_truncate clamps the ratio to [clip_min, clip_max]; *_mask sets it to 0 outside."""
    mask = mask.to(old_logp.dtype)
    diff = torch.nan_to_num((old_logp - sampling_logp) * mask, nan=0.0)
    per_sequence = mode.startswith("sequence")
    ratio = torch.exp(diff.sum(dim=-1, keepdim=True) if per_sequence else diff)
    if mode.endswith("truncate"):
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    elif mode.endswith("mask"):
        low = -math.inf if clip_min is None else clip_min
        high = math.inf if clip_max is None else clip_max
        ratio = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
    else:
        raise ThriftyError(f"vllm_importance_sampling_mode must be token_truncate, token_mask, sequence_truncate "
                           f"or sequence_mask; got {mode!r}.")
    counted = mask.bool()
    delta = (old_logp - sampling_logp).abs()[counted & ~torch.isnan(sampling_logp)]
    flat = ratio.flatten() if per_sequence else ratio[counted]

    def extreme(values: torch.Tensor, op) -> float:  # type: ignore[no-untyped-def]
        return float(op(values)) if values.numel() else 0.0

    return ratio, {"sampling/sampling_logp_difference/mean": extreme(delta, torch.mean),
                   "sampling/sampling_logp_difference/max": extreme(delta, torch.max),
                   "sampling/importance_sampling_ratio/min": extreme(flat, torch.min),
                   "sampling/importance_sampling_ratio/mean": extreme(flat, torch.mean),
                   "sampling/importance_sampling_ratio/max": extreme(flat, torch.max)}


def _loss_metrics(ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                  eps_low: float, eps_high: float) -> dict[str, float]:
    # As TRL, on the ratio after the `delta` cap: a token is "clipped" when the clip took its
    # gradient away, i.e. only on the side the advantage pushes towards.
    low = ((ratio < 1 - eps_low) & (adv < 0)).float()
    high = ((ratio > 1 + eps_high) & (adv > 0)).float()
    region = ((low + high) > 0).float()
    seq_tokens = mask.sum(-1)
    # Per-sequence fractions; fully masked sequences are NaN and skipped, as TRL's nanmin/nanmax.
    low_seq = (low * mask).sum(-1) / seq_tokens
    high_seq = (high * mask).sum(-1) / seq_tokens
    return {
        "clip_ratio/low_mean": _masked_mean(low, mask),
        "clip_ratio/high_mean": _masked_mean(high, mask),
        "clip_ratio/region_mean": _masked_mean(region, mask),
        "clip_ratio/low_min": _nan_extreme(low_seq, torch.min),
        "clip_ratio/high_max": _nan_extreme(high_seq, torch.max),
        "num_tokens": mask.sum().item(),
    }


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return ((x * mask).sum() / mask.sum().clamp(min=1.0)).item()


def _nan_extreme(x: torch.Tensor, op) -> float:  # type: ignore[no-untyped-def]
    x = x[~torch.isnan(x)]
    return op(x).item() if x.numel() else math.nan


# --------------------------------------------------------------------------- dynamic sampling


def dynamic_sampling_filter(rewards: torch.Tensor) -> torch.Tensor:
    """[groups] bool, for combined rewards [groups, G]: True for groups whose rewards are
    not all equal.

    DAPO's dynamic sampling: a group where every completion got the same reward has zero
    advantages, so it only dilutes the batch. NaN (unscorable) rewards are ignored; a group
    with fewer than two scorable completions is uninformative too. (DAPO filters on accuracy;
    this filters on the combined reward, which is what the advantages are computed from.)
    """
    grouped = _grouped(rewards)
    valid = ~torch.isnan(grouped)
    hi = torch.where(valid, grouped, torch.full_like(grouped, -math.inf)).amax(dim=1)
    lo = torch.where(valid, grouped, torch.full_like(grouped, math.inf)).amin(dim=1)
    return (valid.sum(dim=1) >= 2) & (hi > lo)


T = TypeVar("T")


@dataclass
class InformativeGroups(Generic[T]):
    """What `collect_informative_groups` gathered."""

    wanted: int
    groups: list[T] = field(default_factory=list)  # at most `wanted`, in draw order
    rewards: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [len(groups), G]
    num_discarded: int = 0  # uninformative groups thrown away
    num_surplus: int = 0  # informative groups beyond `wanted` in the last draw, dropped
    num_draws: int = 0  # candidate batches drawn (each costs a round of generation)

    @property
    def complete(self) -> bool:
        return len(self.groups) >= self.wanted


def collect_informative_groups(
    candidates: Iterable[tuple[Sequence[T], torch.Tensor]],
    wanted: int,
    max_draws: int,
) -> InformativeGroups[T]:
    """Draw candidate batches until `wanted` informative groups are collected or `max_draws` is hit.

    candidates yields (groups, rewards): a batch of groups (whatever the trainer keeps per
    prompt: completions, ids, log-probs...) and their combined rewards, [len(groups), G].
    It is consumed lazily, so generation happens only while groups are still missing.
    When max_draws runs out first the result holds fewer groups (check `.complete`): DAPO
    would keep sampling, but on a CPU an unbounded loop is worse than a smaller batch.
    """
    if wanted < 1 or max_draws < 1:
        raise ValueError(f"wanted ({wanted}) and max_draws ({max_draws}) must be >= 1.")
    out: InformativeGroups[T] = InformativeGroups(wanted)
    kept_rewards: list[torch.Tensor] = []
    for groups, rewards in candidates:
        out.num_draws += 1
        if rewards.dim() != 2 or rewards.shape[0] != len(groups):
            raise ValueError(f"rewards of shape {tuple(rewards.shape)} for {len(groups)} groups; expected [groups, G].")
        keep = dynamic_sampling_filter(rewards)
        for group, group_rewards, informative in zip(groups, rewards, keep.tolist()):
            if not informative:
                out.num_discarded += 1
            elif len(out.groups) < wanted:
                out.groups.append(group)
                kept_rewards.append(group_rewards)
            else:
                out.num_surplus += 1
        if len(out.groups) >= wanted or out.num_draws >= max_draws:
            break
    out.rewards = torch.stack(kept_rewards) if kept_rewards else torch.empty(0, 0)
    return out


# --------------------------------------------------------------------------- helpers


def _per_function(per_function: torch.Tensor) -> torch.Tensor:
    if per_function.dim() < 2:
        raise ValueError(f"per-function rewards must be [num_funcs, ...]; got {tuple(per_function.shape)}.")
    return per_function.float()


def _weights(weights: Sequence[float] | torch.Tensor | None, num_funcs: int, device: torch.device) -> torch.Tensor:
    if weights is None:
        return torch.ones(num_funcs, device=device)
    w = torch.as_tensor(weights, dtype=torch.float32, device=device).reshape(-1)
    if w.numel() != num_funcs:
        raise ThriftyError(
            f"reward_weights has {w.numel()} entries but there are {num_funcs} reward functions: "
            "give one weight per reward function, in the same order."
        )
    return w


def _grouped(rewards: torch.Tensor) -> torch.Tensor:
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards must be [groups, G]; got {tuple(rewards.shape)}.")
    return rewards.float()

"""GRPO's pure parts against hand-written loop references and against TRL's own code."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from thrifty.errors import ThriftyError
from thrifty.grpo.loss import (
    collect_informative_groups,
    combine_rewards,
    completion_mask,
    dynamic_sampling_filter,
    group_advantages,
    grpo_loss,
    reward_metrics,
    rollout_importance_ratio,
)

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


# ----------------------------------------------------------------------------- fixtures


def make_batch(seed: int = 0, B: int = 5, T: int = 7, off_policy: bool = True):
    """float64 log-probs with ratios well outside the clip range, mixed-sign advantages,
    right padding of varying length and one fully masked (truncated) completion."""
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = (logp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4) if off_policy else None
    ref = logp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.3, -0.7, 0.0, -1.9, 0.8], dtype=torch.float64)[:B]
    lengths = torch.tensor([7, 3, 5, 1, 6])[:B]
    truncated = torch.tensor([True, False, False, False, False])[:B]  # row 0 hit the limit
    mask = completion_mask(lengths, T, truncated, mask_truncated_completions=True).double()
    return logp, old, ref, adv, mask


def reference_loss(logp, old, ref, adv, mask, loss_type, beta, eps_low, eps_high, max_len, num_items):
    """Per-token loops, written from the GRPO/DAPO/Dr.GRPO papers' definitions."""
    B, T = logp.shape
    seq_means, total, tokens = [], 0.0, 0
    for i in range(B):
        seq_sum, seq_tokens = 0.0, 0
        for t in range(T):
            if mask[i, t] == 0:
                continue
            o = logp[i, t].detach() if old is None else old[i, t]
            ratio = torch.exp(logp[i, t] - o)
            clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
            term = -torch.minimum(ratio * adv[i], clipped * adv[i])
            if beta:
                d = ref[i, t] - logp[i, t]
                term = term + beta * (torch.exp(d) - d - 1)
            seq_sum = seq_sum + term
            seq_tokens += 1
        seq_means.append(seq_sum / max(seq_tokens, 1))
        total, tokens = total + seq_sum, tokens + seq_tokens
    if loss_type == "grpo":
        return sum(seq_means) / B
    if loss_type == "bnpo":
        return total / max(tokens, 1)
    if loss_type == "dr_grpo":
        return total / (B * max_len)
    return total / num_items


# ----------------------------------------------------------------------------- loss vs loops


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("off_policy", [False, True])
def test_loss_and_grad_match_loop_reference(loss_type, beta, off_policy):
    logp, old, ref, adv, mask = make_batch(off_policy=off_policy)
    kwargs = dict(loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28, max_completion_length=9,
                  num_items_in_batch=31)
    loss, metrics = grpo_loss(logp, old, ref if beta else None, adv, mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, logp)
    expected = reference_loss(logp, old, ref, adv, mask, loss_type, beta, 0.2, 0.28, 9, 31)
    (expected_grad,) = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert grad[mask == 0].abs().max() == 0  # padding and the truncated row get no gradient
    assert ("kl" in metrics) == (beta != 0)


def test_clipping_is_asymmetric_and_one_sided():
    # Ratios 0.5, 0.9, 1.1, 1.25, 1.5 with eps 0.2 / eps_high 0.3: clip range [0.8, 1.3].
    ratios = torch.tensor([0.5, 0.9, 1.1, 1.25, 1.5], dtype=torch.float64)
    logp = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)
    old = -torch.log(ratios).repeat(2, 1)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.float64)
    loss, metrics = grpo_loss(logp, old, None, adv, mask, loss_type="bnpo", epsilon=0.2, epsilon_high=0.3)
    (grad,) = torch.autograd.grad(loss, logp)
    # d(-min(rA, clip(r)A))/dlogp = -A r where the unclipped term is the min, else 0.
    # A > 0: clipped (no grad) only above 1.3; A < 0: only below 0.8.
    live_pos = torch.tensor([1, 1, 1, 1, 0], dtype=torch.float64)
    live_neg = torch.tensor([0, 1, 1, 1, 1], dtype=torch.float64)
    torch.testing.assert_close(grad[0], -ratios * live_pos / 10)
    torch.testing.assert_close(grad[1], ratios * live_neg / 10)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(1 / 10)
    assert metrics["clip_ratio/low_mean"] == pytest.approx(1 / 10)
    assert metrics["clip_ratio/region_mean"] == pytest.approx(2 / 10)
    assert metrics["clip_ratio/high_max"] == pytest.approx(1 / 5)
    assert metrics["clip_ratio/low_min"] == pytest.approx(0.0)  # row 0 has no low clipping


def test_on_policy_ratio_is_one_with_policy_gradient():
    logp, _, _, adv, mask = make_batch(off_policy=False)
    loss, metrics = grpo_loss(logp, None, None, adv, mask, loss_type="grpo")
    (grad,) = torch.autograd.grad(loss, logp)
    # ratio == 1: loss = -mean A, gradient = -A / (tokens in its sequence) / B per token.
    per_seq_tokens = mask.sum(-1).clamp(min=1)
    torch.testing.assert_close(grad, -(adv / per_seq_tokens / 5)[:, None] * mask)
    assert metrics["clip_ratio/region_mean"] == 0.0


def test_k3_kl_value_and_metric():
    logp = torch.log(torch.tensor([[0.5, 0.25]], dtype=torch.float64)).requires_grad_()
    ref = torch.log(torch.tensor([[0.25, 0.25]], dtype=torch.float64))
    mask = torch.ones(1, 2, dtype=torch.float64)
    loss, metrics = grpo_loss(logp, None, ref, torch.zeros(1, dtype=torch.float64), mask, loss_type="bnpo", beta=1.0)
    k3 = 0.5 - math.log(0.5) - 1  # exp(d) - d - 1 with d = log(0.25/0.5)
    assert loss.item() == pytest.approx(k3 / 2)
    assert metrics["kl"] == pytest.approx(k3 / 2)


def test_gradient_accumulation_scaling():
    logp, old, _, adv, mask = make_batch()
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        one, _ = grpo_loss(logp, old, None, adv, mask, loss_type=loss_type, max_completion_length=8)
        four, m = grpo_loss(logp, old, None, adv, mask, loss_type=loss_type, max_completion_length=8,
                            gradient_accumulation_steps=4)
        torch.testing.assert_close(four, one / 4)
        assert m["policy_loss"] == pytest.approx(one.item())
    # dapo is normalised by the step's token count instead: accumulation does not rescale it.
    one, _ = grpo_loss(logp, old, None, adv, mask, loss_type="dapo", num_items_in_batch=40)
    four, _ = grpo_loss(logp, old, None, adv, mask, loss_type="dapo", num_items_in_batch=40, gradient_accumulation_steps=4)
    torch.testing.assert_close(one, four)
    # Default num_items_in_batch: this micro-batch's tokens, i.e. bnpo.
    dapo, _ = grpo_loss(logp, old, None, adv, mask, loss_type="dapo")
    bnpo, _ = grpo_loss(logp, old, None, adv, mask, loss_type="bnpo")
    torch.testing.assert_close(dapo, bnpo)


def test_completion_mask():
    lengths, truncated = torch.tensor([3, 0, 4]), torch.tensor([False, False, True])
    assert completion_mask(lengths, 4).tolist() == [[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert completion_mask(lengths, 4, truncated, True).tolist() == [[1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_loss_errors():
    logp, old, _, adv, mask = make_batch()
    with pytest.raises(ThriftyError, match="loss_type"):
        grpo_loss(logp, old, None, adv, mask, loss_type="ppo")  # type: ignore[arg-type]
    with pytest.raises(ThriftyError, match="max_completion_length"):
        grpo_loss(logp, old, None, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, None, adv, mask, beta=0.1)


# ----------------------------------------------------------------------------- advantages


def loop_advantages(rewards: list[float], G: int, scale: str) -> list[float]:
    batch_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    out = []
    for start in range(0, len(rewards), G):
        group = rewards[start:start + G]
        mean = sum(group) / G
        std = statistics.stdev(group) if G > 1 else 0.0  # unbiased, as TRL's nanstd
        for r in group:
            a = r - mean
            out.append(a / (std + 1e-4) if scale == "group" else a / (batch_std + 1e-4) if scale == "batch" else a)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_loops(scale):
    rewards = [1.0, 0.0, 0.5, 0.0, 2.0, 2.0, 2.0, 2.0, -1.0, 3.0, 0.25, 0.0]
    got = group_advantages(torch.tensor(rewards).view(3, 4), scale)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got.flatten(), torch.tensor(loop_advantages(rewards, 4, scale)), rtol=1e-5, atol=1e-5)
    assert got[1].abs().max() == 0  # a group with equal rewards has no signal


def test_advantages_bool_scale_and_errors():
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(group_advantages(r, True), group_advantages(r, "group"))
    torch.testing.assert_close(group_advantages(r, False), group_advantages(r, "none"))
    with pytest.raises(ThriftyError, match="scale_rewards"):
        group_advantages(r, "global")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        group_advantages(r.flatten())  # flat rewards: the groups are not known


def test_unscorable_completions_get_zero_advantage():
    per_function = torch.tensor([[[1.0, math.nan, 0.0], [1.0, math.nan, math.nan]],
                                 [[0.5, math.nan, 0.0], [math.nan, math.nan, 1.0]]])  # [funcs, groups, G]
    rewards = combine_rewards(per_function, [1.0, 2.0])
    assert rewards.shape == (2, 3)
    assert rewards[0, 0] == 2.0 and math.isnan(rewards[0, 1]) and rewards[0, 2] == 0.0
    assert rewards[1, 0] == 1.0 and math.isnan(rewards[1, 1]) and rewards[1, 2] == 2.0
    adv = group_advantages(rewards, "group")
    assert adv[0, 1] == 0 and adv[1, 1] == 0
    # Group 0's baseline ignores the unscorable completion: mean(2, 0) = 1, std = sqrt(2).
    assert adv[0, 0].item() == pytest.approx(1 / (math.sqrt(2) + 1e-4), rel=1e-5)


def test_reward_metrics():
    per_function = torch.tensor([[1.0, 0.0, 1.0, 1.0], [math.nan, 0.5, 0.5, 0.5]]).view(2, 2, 2)
    m = reward_metrics(per_function, ["acc", "fmt"])
    assert m["rewards/acc/mean"] == pytest.approx(0.75)
    assert m["rewards/fmt/mean"] == pytest.approx(0.5)  # over the completions it scored
    assert m["reward"] == pytest.approx((1.0 + 0.5 + 1.5 + 1.5) / 4)
    assert m["frac_reward_zero_std"] == pytest.approx(0.5)  # second group: 1.5, 1.5
    with pytest.raises(ThriftyError, match="reward_weights"):
        combine_rewards(per_function, [1.0])


# ----------------------------------------------------------------------------- dynamic sampling


def test_dynamic_sampling_filter():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, math.nan, 0.0, math.nan, math.nan, 1.0, 2.0])
    assert dynamic_sampling_filter(rewards.view(4, 3)).tolist() == [False, True, False, True]


def test_collect_informative_groups_refills_lazily():
    drawn = []

    def candidates():
        batches = [
            (["a", "b"], torch.tensor([[1.0, 1.0], [0.0, 1.0]])),  # a uninformative, b kept
            (["c", "d"], torch.tensor([[0.0, 0.0], [0.0, 0.0]])),  # both discarded
            (["e", "f"], torch.tensor([[1.0, 0.0], [0.5, 0.0]])),  # e kept, f surplus
            (["g", "h"], torch.tensor([[1.0, 0.0], [1.0, 0.0]])),  # never drawn
        ]
        for batch in batches:
            drawn.append(batch[0])
            yield batch

    out = collect_informative_groups(candidates(), wanted=2, max_draws=10)
    assert out.groups == ["b", "e"] and out.complete
    assert out.rewards.tolist() == [[0.0, 1.0], [1.0, 0.0]]
    assert (out.num_discarded, out.num_surplus, out.num_draws) == (3, 1, 3)
    assert len(drawn) == 3  # generation stopped as soon as the batch was full


def test_collect_informative_groups_stops_at_max_draws():
    def candidates():
        while True:
            yield ["x"], torch.tensor([[1.0, 1.0]])

    out = collect_informative_groups(candidates(), wanted=4, max_draws=5)
    assert out.groups == [] and not out.complete
    assert (out.num_discarded, out.num_draws) == (5, 5)


# ----------------------------------------------------------------------------- against TRL


@pytest.fixture(scope="module")
def trl_grpo():
    import trl.trainer.grpo_trainer  # a declared test dependency: a failed import must fail the test

    return trl.trainer.grpo_trainer


def trl_compute_loss(trl_grpo, logp, old, ref, adv, mask, *, loss_type, beta, epsilon, epsilon_high,
                     max_completion_length, num_items_in_batch, grad_accum, delta=None):
    """Run TRL's GRPOTrainer._compute_loss on our tensors: a stand-in `self` whose
    model forward returns `logp`, one process, token-level importance sampling."""
    B, T = logp.shape
    metrics = {"train": defaultdict(list)}
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon_high,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=grad_accum),
        use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=grad_accum, max_completion_length=max_completion_length,
        accelerator=SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t,
                                    gather_for_metrics=lambda t: t),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=metrics,
    )
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "num_items_in_batch": torch.tensor(float(num_items_in_batch))}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if beta:
        inputs["ref_per_token_logps"] = ref
    loss = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, {k: v[0] for k, v in metrics["train"].items()}


@pytest.mark.parametrize(("loss_type", "delta"), [(t, None) for t in LOSS_TYPES] + [("dapo", 1.5)])
def test_loss_matches_trl(trl_grpo, loss_type, delta):
    logp, old, ref, adv, mask = make_batch(seed=3)
    # One optimizer step of 2 micro-batches on 1 rank: TRL's dapo normaliser is the step's
    # token count, ours is given the same; the others divide by the accumulation steps.
    step_tokens = mask.sum().item() + 17
    common = dict(loss_type=loss_type, beta=0.04, epsilon=0.2, epsilon_high=0.28, max_completion_length=9,
                  delta=delta)
    theirs, their_metrics = trl_compute_loss(trl_grpo, logp, old, ref, adv, mask, num_items_in_batch=step_tokens,
                                             grad_accum=2, **common)
    (their_grad,) = torch.autograd.grad(theirs, logp)
    ours, our_metrics = grpo_loss(logp, old, ref, adv, mask, num_items_in_batch=step_tokens,
                                  gradient_accumulation_steps=2, **common)
    (our_grad,) = torch.autograd.grad(ours, logp)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-12, atol=1e-12)
    for key in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max"):
        assert our_metrics[key] == pytest.approx(their_metrics[key], rel=1e-9, abs=1e-12), key


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tiny_tokenizer import save_tiny_model_dir

    directory = tmp_path_factory.mktemp("tiny-llama-trl")
    save_tiny_model_dir("llama", directory)
    return directory


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_trls_own_code(trl_grpo, tiny_hf_dir, tmp_path, scale):
    """TRL's GRPOTrainer scores a real generation batch (its _generate_and_score_completions,
    with two weighted reward functions, one of which abstains with None); Thrifty's
    combine_rewards and group_advantages on the very rewards those functions returned give
    TRL's advantages."""
    import datasets
    import transformers
    import trl

    returned: list[list[float | None]] = []

    def graded(completions, **kwargs):  # type: ignore[no-untyped-def]
        values = [float((len(c) * 7 + 3 * len(returned)) % 4) for c in completions]
        returned.append(values)
        return values

    def sometimes(completions, **kwargs):  # type: ignore[no-untyped-def]
        values = [None if i % 3 == 0 else float(len(c) % 2) for i, c in enumerate(completions)]
        returned.append(values)
        return values

    prompts = ["say red", "say blue", "say sun", "say one"]
    trainer = trl.GRPOTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32),
        processing_class=transformers.AutoTokenizer.from_pretrained(tiny_hf_dir), reward_funcs=[graded, sometimes],
        train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]),
        args=trl.GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, num_generations=4,
                            per_device_train_batch_size=16, max_completion_length=6, scale_rewards=scale,
                            reward_weights=[1.0, 0.5], disable_tqdm=True))
    out = trainer._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(4)])
    per_function = torch.tensor([[math.nan if v is None else v for v in values] for values in returned])
    ours = group_advantages(combine_rewards(per_function.view(2, 4, 4), [1.0, 0.5]), scale)
    assert per_function[0].std() > 0  # varied rewards, so the advantages are not all zero
    torch.testing.assert_close(ours.flatten(), out["advantages"].float(), rtol=1e-6, atol=1e-6)


# ------------------------------------------ rollouts from other weights: TRL's vLLM correction


@pytest.mark.parametrize(("mode", "clip_min", "clip_max"), [
    ("token_truncate", 0.5, 1.5), ("token_mask", 0.8, 1.25), ("sequence_truncate", None, 1.5),
    ("sequence_mask", None, 3.0), ("sequence_mask", 0.5, None)])
def test_rollout_importance_ratio_is_trls_own(trl_grpo, tiny_hf_dir, tmp_path, mode, clip_min, clip_max):
    """TRL's GRPOTrainer, as with vLLM, scores a batch whose sampling log-probs we supply
    (one NaN among them, as vLLM can return): its importance_sampling_ratio and metrics
    equal rollout_importance_ratio on its own old log-probs, and its loss times that ratio
    equals grpo_loss given it."""
    import datasets
    import transformers
    import trl

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
    trainer = trl.GRPOTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32),
        processing_class=tokenizer, reward_funcs=[lambda completions, **kw: [float(len(c) % 3) for c in completions]],
        train_dataset=datasets.Dataset.from_list([{"prompt": "say red"}, {"prompt": "say sun"}]),
        args=trl.GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, num_generations=4,
                            per_device_train_batch_size=8, max_completion_length=6, disable_tqdm=True))
    rng = torch.Generator().manual_seed(4)
    prompt_ids = [tokenizer("say red")["input_ids"]] * 4 + [tokenizer("say sun")["input_ids"]] * 4
    completions = [torch.randint(3, 90, (n,), generator=rng).tolist() for n in (6, 3, 5, 6, 1, 4, 6, 2)]
    sampling = [[-5.0] * len(c) for c in completions]  # first pass: learn the model's own log-probs

    def fake_generate(prompts):  # type: ignore[no-untyped-def]
        texts = tokenizer.batch_decode(completions)
        return prompt_ids, completions, None, texts, sampling, {}, None, None

    trainer._generate = fake_generate
    trainer.use_vllm = True
    trainer.vllm_importance_sampling_correction = True
    trainer.vllm_importance_sampling_mode = mode
    trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max = clip_min, clip_max
    inputs = [{"prompt": "say red"}] * 4 + [{"prompt": "say sun"}] * 4
    model_logps = trainer._generate_and_score_completions(inputs)["old_per_token_logps"]
    # Sampling log-probs near the model's (a quantized copy's are), so that some ratios pass
    # the clips and some do not; one unknown, as vLLM can return.
    sampling = [(model_logps[i, :len(c)] + 0.6 * torch.randn(len(c), generator=rng)).tolist()
                for i, c in enumerate(completions)]
    sampling[2][1] = float("nan")
    out = trainer._generate_and_score_completions(inputs)
    their_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("sampling/")}

    old, mask = out["old_per_token_logps"], out["completion_mask"].float()
    T = mask.shape[1]
    ours_sampling = torch.tensor([s + [0.0] * (T - len(s)) for s in sampling])
    ratio, metrics = rollout_importance_ratio(old, ours_sampling, mask, mode=mode, clip_min=clip_min,
                                              clip_max=clip_max)
    torch.testing.assert_close(ratio, out["importance_sampling_ratio"], rtol=1e-6, atol=0)
    assert 0 < (ratio == 0).sum() < ratio.numel() or mode.endswith("truncate")  # the masks do mask something
    for key, value in their_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6), key

    logp = (old + 0.05 * torch.randn(old.shape, generator=rng)).requires_grad_()
    adv = torch.randn(8, generator=rng)
    theirs, _ = trl_compute_loss_with_ratio(trl_grpo, logp, old, adv, mask, out["importance_sampling_ratio"])
    ours, _ = grpo_loss(logp, old, None, adv, mask, loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
                        num_items_in_batch=mask.sum().item(), importance_sampling_ratio=ratio)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def trl_compute_loss_with_ratio(trl_grpo, logp, old, adv, mask, ratio):  # type: ignore[no-untyped-def]
    B, T = logp.shape
    metrics = {"train": defaultdict(list)}
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=0.0, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=True, vllm_importance_sampling_correction=True, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=T,
        accelerator=SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t,
                                    gather_for_metrics=lambda t: t),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=metrics,
    )
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "num_items_in_batch": torch.tensor(float(mask.sum())),
              "old_per_token_logps": old, "importance_sampling_ratio": ratio}
    return trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs), metrics

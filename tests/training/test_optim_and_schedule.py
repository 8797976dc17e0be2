"""The learning-rate schedules against transformers' own, gradient clipping against
torch.nn.utils.clip_grad_norm_, and the fp32-master AdamW against torch's AdamW run on
float32 copies (the reference the masters stand for)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from thrifty.training.optim import MasterWeightAdamW, NonFiniteGradients
from thrifty.training.schedule import lr_factor, warmup_steps_for


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("total, warmup_steps, warmup_ratio", [(50, 0, 0.0), (50, 5, 0.0), (37, 0, 0.1), (10, 3, 0.5)])
def test_schedules_equal_transformers(kind: str, total: int, warmup_steps: int, warmup_ratio: float) -> None:
    warmup = warmup_steps_for(total, warmup_steps, warmup_ratio)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    name = "constant_with_warmup" if kind == "constant" else kind
    scheduler = transformers.get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total):
        assert lr_factor(step, total, warmup, kind) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12), step
        optimizer.step()
        scheduler.step()


def make_params(dtype: torch.dtype, seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    return [("w", nn.Parameter(torch.randn(8, 6, generator=g).to(dtype))),
            ("b", nn.Parameter(torch.randn(6, generator=g).to(dtype)))]


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5, 100.0])
def test_clipping_and_adamw_equal_torch(max_grad_norm: float) -> None:
    """float32 parameters: the same updates as clip_grad_norm_ + torch AdamW (weight decay
    only on matrices, as transformers' Trainer groups them)."""
    ours = make_params(torch.float32)
    theirs = [p.detach().clone().requires_grad_(True) for _, p in make_params(torch.float32)]
    optimizer = MasterWeightAdamW(ours, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    reference = torch.optim.AdamW([{"params": [theirs[0]], "weight_decay": 0.1},
                                   {"params": [theirs[1]], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) * 3 for _, p in ours]
        for (_, p), q, grad in zip(ours, theirs, grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        norm = optimizer.step(max_grad_norm)
        expected = (torch.nn.utils.clip_grad_norm_(theirs, max_grad_norm) if max_grad_norm > 0
                    else torch.linalg.vector_norm(torch.stack([q.grad.norm() for q in theirs])))
        reference.step()
        assert norm == pytest.approx(float(expected), rel=1e-6)
        for (_, p), q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        optimizer.zero_grad()


def test_bf16_weights_follow_their_float32_masters() -> None:
    """bf16 parameters: the masters take exactly the float32 run's steps (tiny updates that
    bf16 would round away accumulate), and each bf16 weight is its master rounded."""
    ours = make_params(torch.bfloat16)
    theirs = [p.detach().float().requires_grad_(True) for _, p in ours]
    optimizer = MasterWeightAdamW(ours, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    reference = torch.optim.AdamW(theirs, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    start = [p.detach().clone() for _, p in ours]
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        grads = [torch.randn(p.shape, generator=g) for _, p in ours]
        for (_, p), q, grad in zip(ours, theirs, grads):
            p.grad, q.grad = grad.to(torch.bfloat16), grad.to(torch.bfloat16).float()
        optimizer.step(0.0)
        reference.step()
    for (_, p), q, m, s in zip(ours, theirs, optimizer.masters, start):
        torch.testing.assert_close(m, q, rtol=0, atol=0)
        assert torch.equal(p, q.to(torch.bfloat16))
        assert not torch.equal(p, s)  # 20 steps of 1e-4 moved the bf16 weights (one alone would round away)


def test_non_finite_gradients_apply_nothing() -> None:
    ours = make_params(torch.float32)
    before = [p.detach().clone() for _, p in ours]
    optimizer = MasterWeightAdamW(ours, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    ours[0][1].grad = torch.full((8, 6), float("nan"))
    with pytest.raises(NonFiniteGradients):
        optimizer.step(1.0)
    assert all(torch.equal(p, b) for (_, p), b in zip(ours, before))

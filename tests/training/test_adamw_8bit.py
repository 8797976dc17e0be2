"""The 8-bit AdamW against bitsandbytes' own code (its dynamic codes, its CPU dequantization
and update kernels, its optimizer class) and against a float64 nearest-value search."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from thrifty.layers.quant import dynamic_code_8bit
from thrifty.kernels.native import native_kernel
from thrifty.training.adamw_8bit import BLOCK, MIN_8BIT_SIZE, AdamW8bit, BlockwiseCode
from thrifty.training.optim import MasterWeightAdamW

bnb = pytest.importorskip("bitsandbytes", reason="the test extra installs bitsandbytes, the reference")
F = pytest.importorskip("bitsandbytes.functional")


def moments_like(n: int, signed: bool, seed: int) -> torch.Tensor:
    """Magnitudes over eight decades (as Adam's moments), some blocks all zero, a row tail."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-8, 0, n)[torch.randperm(n, generator=g)]
    x[:BLOCK] = 0.0  # an all-zero block: scale 0
    x[BLOCK] = 1e30  # an extreme scale: everything else in its block rounds to 0
    return x if signed else x.abs()


@pytest.mark.parametrize("signed", [True, False])
def test_codes_are_bitsandbytes_dynamic_maps(signed: bool) -> None:
    assert torch.equal(dynamic_code_8bit(signed), F.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [3 * BLOCK, 5 * BLOCK + 77])
def test_quantize_picks_the_nearest_code_value_and_dequantizes_as_bitsandbytes(signed: bool, n: int) -> None:
    """Scales equal bitsandbytes'; every index is a nearest code value (float64 search over
    all 256; bitsandbytes' CUDA kernel searches for it, its CPU binary search misses it on
    about half the elements, so the indices are not compared with the CPU's); dequantizing
    equals bitsandbytes' CPU kernel bit for bit."""
    codes = BlockwiseCode(signed)
    x = moments_like(n, signed, seed=n)
    indices, absmax = codes.quantize(x)
    _, their_absmax = torch.ops.bitsandbytes.quantize_blockwise(x, codes.code.clone(), BLOCK)
    assert torch.equal(absmax, their_absmax)
    scale = absmax.double().repeat_interleave(BLOCK)[:n]
    normalized = torch.where(scale > 0, x.double() / scale, 0.0)
    distance = (normalized[:, None] - codes.code.double()[None]).abs()
    chosen = distance.gather(1, indices.long()[:, None]).squeeze(1)
    assert torch.all(chosen <= distance.min(dim=1).values + 1e-7 * normalized.abs())
    # Mutation caught: searching the code values instead of their midpoints (rounding up to
    # a neighbour) leaves about half the elements one code value off.
    dequantized = codes.dequantize(indices, absmax)
    theirs = torch.ops.bitsandbytes.dequantize_blockwise(indices, absmax, codes.code.clone(), BLOCK, torch.float32)
    assert torch.equal(dequantized, theirs)


def test_one_step_from_the_same_state_equals_bitsandbytes_kernel() -> None:
    """Random 8-bit moments and gradients through bitsandbytes' CPU update kernel and
    through our PyTorch definition (the C++ step is held to it below): the same weights
    bit for bit (the update is computed in float32 with the same operations), and the same
    new scales (both quantize the same float32 moments)."""
    g = torch.Generator().manual_seed(7)
    shape = (96, 70)  # 6720 elements: 8-bit, with a tail block
    signed, unsigned = BlockwiseCode(True), BlockwiseCode(False)
    state1, absmax1 = signed.quantize(torch.randn(shape, generator=g) * 1e-3)
    state2, absmax2 = unsigned.quantize(torch.rand(shape, generator=g) * 1e-6)
    weights = torch.randn(shape, generator=g)
    grad = torch.randn(shape, generator=g) * 1e-3
    ours = nn.Parameter(weights.clone())
    optimizer = AdamW8bit([ours], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, use_kernel=False)
    optimizer.state[ours].update(step=4, state1=state1.clone(), state2=state2.clone(), absmax1=absmax1.clone(),
                                 absmax2=absmax2.clone())
    ours.grad = grad.clone()
    optimizer.step()
    theirs = weights.clone()
    s1, s2, a1, a2 = state1.clone(), state2.clone(), absmax1.clone(), absmax2.clone()
    torch.ops.bitsandbytes.optimizer_update_8bit_blockwise(
        "adam", grad.clone(), theirs, s1, s2, 0.9, 0.999, 0.0, 0.0, 1e-8, 5, 1e-3, signed.code.clone(),
        unsigned.code.clone(), a1, a2, 0.1, 1.0, False)
    assert torch.equal(ours.detach(), theirs)
    # Both quantized the same float32 moments: the scales agree exactly.
    assert torch.equal(optimizer.state[ours]["absmax1"], a1) and torch.equal(optimizer.state[ours]["absmax2"], a2)


def test_small_tensors_keep_float32_moments_as_bitsandbytes() -> None:
    """Below min_8bit_size (4096) bitsandbytes keeps float32 state: the same weights as its
    AdamW8bit, bit for bit, over several steps."""
    g = torch.Generator().manual_seed(3)
    start = torch.randn(64, 40, generator=g) * 0.1
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    mine = AdamW8bit([ours], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    reference = bnb.optim.AdamW8bit([theirs], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for _ in range(5):
        grad = torch.randn(start.shape, generator=g) * torch.rand(start.shape, generator=g) ** 4
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        mine.step()
        reference.step()
    assert mine.state[ours]["state1"].dtype == torch.float32
    assert torch.equal(ours.detach(), theirs.detach())


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("shape", [(64, 40), (96, 70)])  # float32 moments, 8-bit moments
def test_bf16_weights_keep_updates_below_their_resolution(shape: tuple[int, int], use_kernel: bool) -> None:
    """bf16 weights, 40 steps of lr 1e-4 (each update ~1e-4, below half a bf16 ulp of
    weights ~0.1-1): weight + low half follows the same optimizer on float32 weights to
    the low half's rounding, at most 2^-18 |w| a step (half a bf16 ulp of a low half that
    is at most half a bf16 ulp of w), while bitsandbytes' AdamW8bit on bf16 weights, which
    rounds each update away, ends far off. Mutation caught: not writing the low half back."""
    g = torch.Generator().manual_seed(4)
    start = (torch.randn(shape, generator=g) * 0.5).to(torch.bfloat16)
    ours, exact, theirs = (nn.Parameter(start.clone()), nn.Parameter(start.float()), nn.Parameter(start.clone()))
    settings = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    optimizers = [AdamW8bit([ours], **settings, use_kernel=use_kernel),
                  AdamW8bit([exact], **settings, use_kernel=use_kernel),
                  bnb.optim.AdamW8bit([theirs], **settings)]
    for _ in range(40):
        grad = torch.randn(shape, generator=g).to(torch.bfloat16)
        ours.grad, exact.grad, theirs.grad = grad.clone(), grad.float(), grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    held = ours.detach().float() + optimizers[0].state[ours]["low"].float()
    ours_off = (held - exact.detach()).abs().max()
    bnb_off = (theirs.detach().float() - exact.detach()).abs().max()
    assert ours_off <= 40 * 2**-18 * exact.abs().max(), float(ours_off)
    assert bnb_off > 10 * ours_off, (float(bnb_off), float(ours_off))


def test_trajectory_follows_32_bit_adamw_with_a_quarter_of_the_state() -> None:
    """50 steps on a noisy quadratic: the 8-bit run stays as close to 32-bit AdamW as
    bitsandbytes' own AdamW8bit does (both quantize the moments; they differ only in
    which code value the CPU search picks), and its state takes 1/4 of the bytes."""
    g = torch.Generator().manual_seed(11)
    target = torch.randn(128, 64, generator=g)
    start = torch.zeros(128, 64)
    params = {name: nn.Parameter(start.clone()) for name in ("ours", "bnb", "fp32")}
    optimizers = {"ours": AdamW8bit([params["ours"]], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
                  "bnb": bnb.optim.AdamW8bit([params["bnb"]], lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                             weight_decay=0.0),
                  "fp32": torch.optim.AdamW([params["fp32"]], lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                            weight_decay=0.0)}
    for _ in range(50):
        noise = torch.randn(start.shape, generator=g) * 0.1
        for name, p in params.items():
            p.grad = (p.detach() - target) + noise
            optimizers[name].step()
    ours_off = (params["ours"] - params["fp32"]).norm() / params["fp32"].norm()
    bnb_off = (params["bnb"] - params["fp32"]).norm() / params["fp32"].norm()
    assert ours_off <= max(1.2 * bnb_off, 1e-3), (float(ours_off), float(bnb_off))
    assert 0 < ours_off < 0.1  # it is quantized, and close (a sign error or a lost moment is ~1)
    state = optimizers["ours"].state[params["ours"]]
    stored = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    assert stored <= 0.26 * 8 * start.numel()


def test_master_weight_optimizer_checkpoints_the_byte_moments() -> None:
    """Through the run's optimizer: a state_dict round trip keeps the moments as bytes (and a
    small tensor's float32 moments float32, not its weights' bf16), and the next steps equal
    the uninterrupted ones bit for bit, the bf16 weights' low halves included."""
    def model() -> list[tuple[str, nn.Parameter]]:
        g = torch.Generator().manual_seed(5)
        return [("w", nn.Parameter(torch.randn(80, 64, generator=g).to(torch.bfloat16))),
                ("b", nn.Parameter(torch.randn(64, generator=g).to(torch.bfloat16)))]

    def grads(step: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(100 + step)
        return [torch.randn(80, 64, generator=g).to(torch.bfloat16), torch.randn(64, generator=g).to(torch.bfloat16)]

    def run(params: list[tuple[str, nn.Parameter]], optimizer: MasterWeightAdamW, steps: range) -> None:
        for step in steps:
            for (_, p), grad in zip(params, grads(step)):
                p.grad = grad
            optimizer.step(1.0)
            optimizer.zero_grad()

    straight = model()
    straight_opt = MasterWeightAdamW(straight, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, eight_bit=True)
    run(straight, straight_opt, range(4))
    first = model()
    first_opt = MasterWeightAdamW(first, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, eight_bit=True)
    run(first, first_opt, range(2))
    saved = first_opt.state_dict()
    resumed = model()
    with torch.no_grad():  # the run's checkpoint restores the weights from its model file
        for (_, p), (_, q) in zip(resumed, first):
            p.copy_(q)
    resumed_opt = MasterWeightAdamW(resumed, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, eight_bit=True)
    resumed_opt.load_state_dict(saved)
    state = resumed_opt.optimizer.state[resumed_opt.masters[0]]
    assert state["state1"].dtype == state["state2"].dtype == torch.uint8
    assert resumed_opt.optimizer.state[resumed_opt.masters[1]]["state1"].dtype == torch.float32  # 64 < 4096
    run(resumed, resumed_opt, range(2, 4))
    for (_, a), (_, b) in zip(resumed, straight):
        assert torch.equal(a, b)


needs_kernel = pytest.mark.skipif(native_kernel("adamw_8bit") is None,
                                  reason="the portable C++ kernels could not be built here (no compiler)")


@needs_kernel
@pytest.mark.parametrize("n", [MIN_8BIT_SIZE, 37 * BLOCK + 5])
def test_kernel_quantizes_to_the_nearest_code_exactly(n: int) -> None:
    """With beta1 = beta2 = 0 the new moments are g and g*g exactly (one rounding, the same
    in both), so the kernel's table lookup must give the PyTorch path's nearest indices
    and scales bit for bit, over eight decades, zero blocks, an extreme block and a tail.
    Mutation caught: a table one fraction bit coarser (cells holding two midpoints) or a
    lookup that drops the comparison with the cell's midpoint."""
    g = moments_like(n, signed=True, seed=n)
    runs = {}
    for use_kernel in (True, False):
        p = nn.Parameter(torch.zeros(n))
        optimizer = AdamW8bit([p], lr=1e-3, betas=(0.0, 0.0), eps=1e-8, weight_decay=0.0, use_kernel=use_kernel)
        p.grad = g.clone()
        optimizer.step()
        runs[use_kernel] = optimizer.state[p]
    for key in ("state1", "state2", "absmax1", "absmax2"):
        assert torch.equal(runs[True][key], runs[False][key]), key


@needs_kernel
def test_kernel_steps_equal_the_pytorch_definition() -> None:
    """Five steps with weight decay, kernel and PyTorch path each on its own state: the
    weights agree to float32 rounding of the update (the kernel may fuse a multiply-add),
    and the moments' indices differ on almost no element, by one code value, where a
    rounded moment sits on a midpoint. A wrong bias correction, decay or moment formula
    moves the weights by ~lr, 1000x the bound."""
    gen = torch.Generator().manual_seed(2)
    start = torch.randn(72, 100, generator=gen)
    params = {k: nn.Parameter(start.clone()) for k in (True, False)}
    optimizers = {k: AdamW8bit([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, use_kernel=k)
                  for k, p in params.items()}
    for _ in range(5):
        grad = torch.randn(start.shape, generator=gen) * torch.rand(start.shape, generator=gen) ** 3
        for k, p in params.items():
            p.grad = grad.clone()
            optimizers[k].step()
    diff = (params[True] - params[False]).abs()
    assert diff.max() <= 5 * 1e-3 * 1e-4 + 1e-6 * start.abs().max(), float(diff.max())
    for key in ("state1", "state2"):
        a, b = optimizers[True].state[params[True]][key].int(), optimizers[False].state[params[False]][key].int()
        assert (a - b).abs().max() <= 1 and (a != b).float().mean() <= 1e-3, key

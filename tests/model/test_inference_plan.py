"""An InferencePlan computes what the modules compute, for the weights of its epoch, and
the engine refuses one whose epoch has passed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from thrifty.errors import ThriftyError
from thrifty.formats.build import build_model
from thrifty.formats.hf import load_hf_config, load_hf_state_dict
from thrifty.generation.engine import generate_tokens
from thrifty.generation.sampling import SamplingParams
from thrifty.kernels import gguf_blocks, matmul
from thrifty.layers.lora import LoraConfig, apply_lora, disable_lora
from thrifty.model.inference_plan import InferencePlan
from thrifty.model.weights_epoch import advance_weights_epoch, weights_epoch

from tiny_models import save_hf_model

GREEDY = SamplingParams()


@pytest.fixture
def tiny(tmp_path: Path):
    save_hf_model("qwen2", tmp_path)  # q/k/v biases exercise the fused bias
    return build_model(load_hf_config(tmp_path), load_hf_state_dict(tmp_path), str(tmp_path)).eval()


def modules_logits(model, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():  # no plan in force: the modules' own forwards
        return model(ids)


def plan_logits(plan: InferencePlan, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), plan.active():
        return plan.model(ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_plan_computes_what_the_modules_compute(tiny, dtype: torch.dtype) -> None:
    model = tiny.to(dtype)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    plan = InferencePlan.build(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert set(plan.groups[attn]) == {"qkv", "o"} and set(plan.groups[mlp]) == {"gate_up", "down"}
    assert set(plan.groups[model]) == {"lm_head"}
    fused, separate = plan_logits(plan, ids), modules_logits(model, ids)
    if dtype == torch.float32:
        # One fp32 matmul over concatenated weights sums in another order: measured 2e-7 here.
        assert (fused - separate).abs().max().item() <= 1e-5
    else:
        # bf16: each path rounds its matmul outputs once to bf16 (2^-8 relative); the
        # difference is at most a few such roundings of the largest logit, not a wrong weight
        # (a stale or missing q/k/v block moves the logits by ~its whole size).
        assert (fused.float() - separate.float()).abs().max().item() <= 2.0**-6 * separate.float().abs().max().item()


@pytest.mark.parametrize("rows", [1, 5, 70])  # the bf16 matvec (a row, a remainder group); float32 panels
def test_without_native_bf16_products_a_plan_reads_the_layers_weights(tiny, rows: int, monkeypatch) -> None:  # type: ignore
    """Where bf16 products are not native (forced here on any CPU), a plan holds no copy of a
    bf16 base: the matvec widens the layers' own weights (a few rows), float32 panels of them
    the rest; LoRA on top, biases added, one rounding. A plan that multiplied by a stale,
    transposed or missing weight moves the logits by their whole size."""
    monkeypatch.setattr(matmul, "bf16_gemm_is_native", lambda: False)
    model = apply_lora(tiny, LoraConfig(r=4, lora_alpha=8)).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    plan = InferencePlan.build(model)
    attn = model.model.layers[0].self_attn
    assert plan.group(attn, "qkv").base.weight is None and plan.group(attn, "qkv").base.bias is not None
    assert plan.group(model, "lm_head").base.weight is None
    ids = torch.randint(0, 97, (rows, 1), generator=torch.Generator().manual_seed(rows))
    got, expected = plan_logits(plan, ids), modules_logits(model, ids)
    assert (got.float() - expected.float()).abs().max().item() <= 2.0**-6 * expected.float().abs().max().item()


def test_a_plan_outlives_no_change_and_the_engine_refuses_a_stale_one(tiny) -> None:
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(1))
    plan = InferencePlan.build(tiny)
    before = plan_logits(plan, ids)
    with torch.no_grad():
        tiny.model.layers[0].self_attn.v_proj.weight.add_(0.5)
    # Unannounced, the change is invisible to the plan (a snapshot of its epoch)...
    assert torch.equal(plan_logits(plan, ids), before)
    advance_weights_epoch(tiny)  # ...announced, the plan is stale: refused, not silently used
    assert not plan.is_current()
    with pytest.raises(ThriftyError, match="weights epoch"):
        generate_tokens(tiny, [[3, 4]], max_new_tokens=2, sampling=GREEDY, plan=plan)
    fresh = plan.for_current_weights()
    assert fresh is not plan and fresh.is_current() and fresh.for_current_weights() is fresh
    after = plan_logits(fresh, ids)
    assert (after - modules_logits(tiny, ids)).abs().max().item() <= 1e-5
    assert (after - before).abs().max().item() > 1e-3  # 100x the fp32 noise of the check above


def test_a_trainable_only_epoch_reuses_frozen_packs_and_restacks_adapters(tiny) -> None:
    model = apply_lora(tiny, LoraConfig(r=4, lora_alpha=8)).to(torch.bfloat16)
    attn = model.model.layers[0].self_attn
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    plans = [InferencePlan.build(model)]
    outputs = []
    for step in range(2):  # optimizer-like updates of the adapters, each announced as a step
        with torch.no_grad():
            for p in lora_b:
                p.copy_(torch.randn_like(p) * 0.1)
        advance_weights_epoch(model, trainable_only=True)
        plans.append(plans[-1].for_current_weights())
        plan = plans[-1]
        # The frozen base's fused copy is shared; the adapters are stacked anew.
        assert plan.group(attn, "qkv").base is plans[0].group(attn, "qkv").base
        got, expected = plan_logits(plan, ids), modules_logits(model, ids)
        # bf16: the plan sums the LoRA branch in fp32 and rounds once, the modules round the
        # branch and the sum separately; a stale adapter stack moves logits by ~0.1-1.
        assert (got.float() - expected.float()).abs().max().item() <= 2.0**-6 * expected.float().abs().max().item()
        outputs.append(got)
    assert not torch.equal(outputs[0], outputs[1])  # each step's plan saw that step's adapters
    # A full epoch (a load, a merge, a resume) rebuilds the base packs too.
    advance_weights_epoch(model)
    rebuilt = plans[-1].for_current_weights()
    assert rebuilt.group(attn, "qkv").base is not plans[0].group(attn, "qkv").base
    # With the adapters off, a plan built then has no adapter stacks; the modules agree.
    with disable_lora(model):
        off = InferencePlan.build(model)
        assert off.group(attn, "qkv").adapters is None
        got, expected = plan_logits(off, ids), modules_logits(model, ids)
    assert (got.float() - expected.float()).abs().max().item() <= 2.0**-6 * expected.float().abs().max().item()


def test_full_fine_tuning_never_reuses_a_trained_base(tiny) -> None:
    """In full fine-tuning the optimizer step changes the base weights themselves: a
    trainable-only epoch must not reuse their packed copy."""
    model = tiny.to(torch.bfloat16).requires_grad_(True)
    attn = model.model.layers[0].self_attn
    plan = InferencePlan.build(model)
    with torch.no_grad():
        attn.v_proj.weight.add_(0.5)
    advance_weights_epoch(model, trainable_only=True)
    fresh = plan.for_current_weights()
    assert fresh.group(attn, "qkv").base is not plan.group(attn, "qkv").base
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    got, expected = plan_logits(fresh, ids), modules_logits(model, ids)
    assert (got.float() - expected.float()).abs().max().item() <= 2.0**-6 * expected.float().abs().max().item()


def test_generation_follows_the_weights_between_plans(tiny) -> None:
    """A bare generate builds its own plan, so it always sees the weights as they are."""
    model = apply_lora(tiny, LoraConfig(r=4, lora_alpha=8)).to(torch.bfloat16)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    prompts = [[3, 4, 5]]
    with torch.no_grad():
        for p in lora_b:
            p.copy_(torch.randn_like(p) * 0.1)
    before, _ = generate_tokens(model, prompts, max_new_tokens=6, sampling=GREEDY)
    with torch.no_grad():
        for p in lora_b:
            p.copy_(torch.randn_like(p))
    after, _ = generate_tokens(model, prompts, max_new_tokens=6, sampling=GREEDY)
    reference = torch.tensor(prompts)  # the same greedy decoding through the modules
    for _ in range(6):
        logits = modules_logits(model, reference)
        reference = torch.cat([reference, logits[:, -1:].argmax(-1)], dim=1)
    assert after[0] == reference[0, 3:].tolist()
    assert after != before


def test_plans_live_outside_the_model(tiny) -> None:
    """Nothing is cached on the modules: a model copies, pickles and compares as it is."""
    model = tiny.to(torch.bfloat16)
    keys = [set(m.__dict__) for m in model.modules()]
    plan = InferencePlan.build(model)
    plan_logits(plan, torch.tensor([[5, 6, 7]]))
    assert [set(m.__dict__) for m in model.modules()] == keys
    clone = copy.deepcopy(model)
    assert weights_epoch(clone) == weights_epoch(model)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(modules_logits(clone, ids), modules_logits(model, ids))


def round_trip(weight: torch.Tensor, qtype: int) -> torch.Tensor:
    """weight as a quantized plan multiplies by it: quantized to GGUF blocks and back."""
    blocks = gguf_blocks.quantize(weight, qtype)
    return gguf_blocks.dequantize(blocks, qtype, weight.shape[1], torch.float32).to(weight.dtype)


@pytest.mark.parametrize("quantization", ["q8_0", "q4_0"])
def test_a_quantized_plan_computes_with_the_blocks_of_its_base_weights(tiny, quantization: str) -> None:
    """The plan's logits are those of the modules with every whole-block base weight
    replaced by its quantized-and-dequantized self, LoRA on top at full precision. Catches
    a plan that quantizes the adapters, skips a group, or forgets the q/k/v biases."""
    model = tiny.float()
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    model = apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    plan = InferencePlan.build(model, quantization=quantization)
    reference = copy.deepcopy(model)
    # The plan quantizes the head, not the embedding lookup: untie them in the reference.
    reference.lm_head.weight = torch.nn.Parameter(reference.lm_head.weight.detach().clone())
    qtype = gguf_blocks.QUANTIZE_TO[quantization]
    quantized = 0
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear) and "lora_" not in name and module.in_features % 32 == 0:
                module.weight.copy_(round_trip(module.weight, qtype))
                quantized += 1
    assert quantized > 0 and plan.decoding_step is None
    expected, full = modules_logits(reference, ids), modules_logits(model, ids)
    got = plan_logits(plan, ids)
    # Measured 3e-6 (the kernels sum in another order); quantization itself moves the logits
    # by ~1e-2 (q8_0) to ~1e-1 (q4_0), so a plan on the unquantized weights fails this.
    assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    assert (got - full).abs().max().item() > 1e-3 * full.abs().max().item()


def test_a_quantized_plan_quantizes_a_frozen_base_once(tiny) -> None:
    model = tiny.float()
    model = apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    plan = InferencePlan.build(model, quantization="q8_0")
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj.lora_B.weight.fill_(0.1)
    advance_weights_epoch(model, trainable_only=True)
    later = plan.for_current_weights()
    assert later is not plan and later.quantization == "q8_0"
    assert later.group(attn, "qkv").base is plan.group(attn, "qkv").base  # the blocks, not made again
    plain = InferencePlan.build(model, previous=later)  # another quantization never lends its packs
    assert plain.group(attn, "qkv").base is not later.group(attn, "qkv").base
    assert plain.group(attn, "qkv").base.qtype is None
    with pytest.raises(ThriftyError, match="q8_0 or q4_0, not 'q3'"):
        InferencePlan.build(model, quantization="q3")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_log_probs_are_the_models_own(tiny, temperature: float) -> None:
    """What the engine reports for each sampled token is the log-softmax of the model's
    logits at the sampling temperature: teacher-forced on prompt + completion, the modules
    give the same numbers (so GRPO's importance ratio is 1 when nothing differs)."""
    model = tiny.float()
    prompts = [[5, 6, 7], [9, 3]]
    sampled: list[list[float]] = []
    tokens, _ = generate_tokens(model, prompts, max_new_tokens=6, sampling=SamplingParams(temperature=temperature),
                                seed=3, num_return_sequences=2, sampled_log_probs=sampled)
    assert [len(s) for s in sampled] == [len(t) for t in tokens]
    for row, (completion, log_probs) in enumerate(zip(tokens, sampled)):
        ids = torch.tensor([prompts[row // 2] + completion])
        logits = modules_logits(model, ids)[0, len(prompts[row // 2]) - 1:-1]
        expected = torch.log_softmax(logits / temperature, dim=-1).gather(1, torch.tensor(completion)[:, None])
        torch.testing.assert_close(torch.tensor(log_probs), expected.squeeze(1), rtol=0, atol=1e-5)

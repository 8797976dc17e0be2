"""The memory plan's counts against the loaded model's, and the plan as the command line
uses it: `thrifty plan` prints it, and a run whose plan does not fit stops before loading."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

from thrifty.formats.loader import load_model
from thrifty.layers.lora import LoraConfig, apply_lora
from thrifty.sft.config import SFTConfig
from thrifty.training.memory_plan import NF4_BYTES, plan_sft, read_model_facts

REPO = Path(__file__).resolve().parents[2]


def test_counts_equal_the_loaded_models() -> None:
    """Parameters, the decoder's projections and LoRA's trainable weights counted on the
    meta-device skeleton equal those of the real default model (a tied head counted once:
    counting it twice would add 28M)."""
    facts = read_model_facts(None)
    model, _ = load_model(None, dtype="float32")
    assert facts.params == sum(p.numel() for p in model.parameters())
    projections = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert facts.linear_params == projections
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        apply_lora(model, LoraConfig(r=8, target_modules=targets))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert facts.lora_params(targets, 8) == trainable, targets
        model, _ = load_model(None, dtype="float32")


def test_parts_follow_the_method_and_the_optimizer() -> None:
    facts = read_model_facts(None)

    def parts(**fields) -> dict[str, int]:  # type: ignore[no-untyped-def]
        plan = plan_sft(facts, SFTConfig(output_dir="unused", **fields))
        return {name.split(":")[0].split(" (")[0]: size for name, size in plan.parts}

    lora, full, full_8bit = parts(), parts(use_lora=False), parts(use_lora=False, optim="adamw_8bit")
    assert lora["weights"] == full["weights"] == 2 * facts.params  # bf16
    assert full["full fine-tuning"] == 16 * facts.params  # fp32 grad + master + two fp32 moments
    assert full_8bit["full fine-tuning"] == 6 * facts.params  # bf16 grad + low half + two bytes
    qlora = parts(quantize="nf4")
    assert qlora["decoder weights"] == int(facts.linear_params * NF4_BYTES)
    short, long = parts(max_length=128), parts(max_length=1024)
    assert long["activations"] == 8 * short["activations"]  # linear in tokens (no T^2 attention matrix)


def thrifty(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "thrifty", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_plan_command_and_a_run_that_does_not_fit(tmp_path: Path) -> None:
    config = REPO / "examples" / "sft_default.yaml"
    shown = thrifty("plan", "sft", str(config), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "predicted peak RSS" in shown.stdout and "fits" in shown.stdout
    # 4096 rows of 8192 tokens per micro-batch need far more than this machine has: the
    # run stops with the plan and what to change, before the model loads (seconds).
    started = time.perf_counter()
    out = tmp_path / "out"
    refused = thrifty("sft", str(config), "per_device_train_batch_size=4096", "max_length=8192",
                      f"output_dir={out}", cwd=tmp_path)
    assert refused.returncode != 0
    assert "this run needs about" in refused.stderr and "per_device_train_batch_size" in refused.stderr
    assert "activations" in refused.stderr  # the plan itself is shown
    assert not out.exists()  # nothing was started
    assert time.perf_counter() - started < 60
    needed = float(refused.stderr.split("needs about ")[1].split(" GiB")[0])
    assert needed > 100  # GiB: 32M tokens of activations

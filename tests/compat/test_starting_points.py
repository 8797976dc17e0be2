"""The three programs people arrive with (examples/coming_from/: an Unsloth SFT notebook,
TRL's GRPO quick start, a transformers + PEFT QLoRA loop) run as scripts on the default
model with only their import lines changed, and the same runs written with Thrifty's own
API give the same losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thrifty.formats.loader import load_model
from thrifty.grpo.config import GRPOConfig
from thrifty.grpo.trainer import TIMING_KEYS, GRPOTrainer
from thrifty.layers.lora import LoraConfig, apply_lora
from thrifty.layers.quant import quantize_model
from thrifty.sft.config import SFTConfig
from thrifty.sft.trainer import SFTTrainer
from thrifty.training.losses import chunked_cross_entropy

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "coming_from"
DATA = REPO / "examples" / "data" / "answer_style.jsonl"


def run_example(name: str, output: Path, steps: int) -> str:
    env = {**os.environ, "MAX_STEPS": str(steps), "HF_HUB_CACHE": str(output / "empty-hub-cache")}
    done = subprocess.run([sys.executable, str(EXAMPLES / name), str(output)], capture_output=True, text=True,
                          env=env, timeout=900, cwd=output.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def metrics(path: Path) -> list[dict]:
    lines = (path / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in (*TIMING_KEYS, "tokens_per_sec")} for line in lines]


def quiet(_: str) -> None:
    pass


def test_unsloth_notebook(tmp_path: Path) -> None:
    out = tmp_path / "unsloth"
    stdout = run_example("unsloth_sft.py", out, steps=3)
    # The script prints prompt + reply; the prompt ends at "### Response:\n", so something
    # after it is the model's reply (a generate() that returned only the prompt fails here).
    reply = stdout.rsplit("### Response:\n", 1)[1].strip()
    assert reply, stdout[-500:]
    assert (out / "lora_model" / "adapter_model.safetensors").is_file()
    assert (out / "model" / "model.Q4_K_M.gguf").is_file() and (out / "model" / "Modelfile").is_file()

    # The same run in Thrifty's own API: NF4 base + LoRA on the 7 projections, seed 3407.
    model, tokenizer = load_model()
    template = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n### Instruction:\n{}\n\n### Input:\n"
                "{}\n\n### Response:\n{}")
    rows = [json.loads(line)["messages"] for line in DATA.open()]
    texts = [{"text": template.format(m[0]["content"], "", m[1]["content"]) + tokenizer.eos_token} for m in rows]
    config = SFTConfig(quantize="nf4", lora_r=16, lora_alpha=16, lora_dropout=0.0,
                       lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                       gradient_checkpointing=True, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                       warmup_steps=5, max_steps=3, learning_rate=2e-4, weight_decay=0.01, seed=3407, max_length=512,
                       logging_steps=1, output_dir=str(tmp_path / "own"), disable_tqdm=True,
                       optim="adamw_8bit")  # as the notebook: bitsandbytes' 8-bit moments
    SFTTrainer(model, tokenizer, config, texts, log=quiet).train()
    theirs, own = metrics(out), metrics(tmp_path / "own")
    assert [r["loss"] for r in theirs] == [r["loss"] for r in own] and len(own) == 3


def test_trl_grpo_quick_start(tmp_path: Path) -> None:
    out = tmp_path / "trl"
    run_example("trl_grpo.py", out, steps=2)

    def reward_len(completions, **kwargs):  # the example's reward
        return [-abs(20 - len(completion[0]["content"])) / 20 for completion in completions]

    model, tokenizer = load_model()
    rows = [{"prompt": [json.loads(line)["messages"][0]]} for line in DATA.open()]
    config = GRPOConfig(per_device_train_batch_size=8, gradient_accumulation_steps=2, num_generations=4,
                        max_completion_length=32, learning_rate=1e-4, max_steps=2, logging_steps=1, lora_r=16,
                        lora_alpha=32, lora_target_modules="all-linear", output_dir=str(tmp_path / "own"),
                        disable_tqdm=True)
    GRPOTrainer(model, tokenizer, reward_funcs=[reward_len], train_dataset=rows, config=config, log=quiet).train()
    theirs, own = metrics(out), metrics(tmp_path / "own")
    assert len(own) == 2 and theirs == own


def test_peft_qlora_loop(tmp_path: Path) -> None:
    out = tmp_path / "peft"
    stdout = run_example("peft_qlora.py", out, steps=3)
    losses = [json.loads(line)["loss"] for line in stdout.splitlines() if line.startswith("{")]
    assert (out / "adapter_config.json").is_file()

    # The same loop on Thrifty's own modules: NF4 (double quantization) + LoRA r=8 on q/v,
    # loss from the final hidden states (chunked), AdamW.
    model, tokenizer = load_model()
    quantize_model(model, "nf4", double_quant=True)
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    texts = [f"Question: what is {a} plus {b}? Answer: {a + b}." for a in range(8) for b in range(4)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    own = []
    for step in range(3):
        ids = [tokenizer.encode(t, add_special_tokens=True) for t in texts[4 * step:][:4]]
        width = max(map(len, ids))
        inputs = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
        labels = torch.tensor([row[1:] + [-100] * (width - len(row) + 1) for row in ids])
        loss_sum, count = chunked_cross_entropy(model.hidden_states(inputs), model.lm_head.weight, labels)
        loss = loss_sum / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        own.append(loss.item())
    # bf16 logits: transformers' loss takes them rounded to bf16, the chunked loss in float32.
    assert losses == pytest.approx(own, rel=5e-3)
    assert losses[2] < losses[0]

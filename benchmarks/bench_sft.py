"""SFT speed and memory: Thrifty vs TRL SFTTrainer + PEFT, same model, data and settings.

Default model, LoRA r=16 on all linear layers, batch 4 x 512 tokens, bf16 weights.
Each configuration runs in its own subprocess (peak RSS belongs to it alone); the
time of each optimizer step is measured, the first steps are dropped as warm-up and
the median is reported. Run:

    .venv/bin/python benchmarks/bench_sft.py              # ~10 min
    .venv/bin/python benchmarks/bench_sft.py --steps 4    # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, LENGTH, RANK = 4, 512, 16
N_PARAMS = 134.5e6  # SmolLM2-135M
BF16_ROOFLINE = 420e9  # FLOP/s, torch bf16 matmul on our 2 cores (DESIGN.md)
# label -> (engine, gradient checkpointing, quantize)
CONFIGS = {
    "trl-lora": ("trl", False, None),
    "thrifty-lora": ("thrifty", False, None),
    "trl-lora-gc": ("trl", True, None),
    "thrifty-lora-gc": ("thrifty", True, None),
    "thrifty-qlora": ("thrifty", False, "nf4"),
}


def training_texts(count: int) -> list[str]:
    """Deterministic English-ish texts that tokenize to at least LENGTH tokens each."""
    import random

    words = ("the model learns from data on a small machine with care and patience while "
             "numbers like 12 and 345 appear in sentences about cats, rivers, code and music").split()
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(LENGTH)) for _ in range(count)]


def run_thrifty(steps: int, checkpointing: bool, quantize: str | None) -> list[float]:
    from thrifty import SFTConfig, SFTTrainer, load_model

    model, tokenizer = load_model(None, dtype="bfloat16")
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, per_device_train_batch_size=BATCH, max_length=LENGTH, truncation="truncate",
            max_steps=steps, logging_steps=1, save_steps=0, use_lora=True, lora_r=RANK, lora_alpha=RANK,
            gradient_checkpointing=checkpointing, quantize=quantize, disable_tqdm=True, num_sample_prompts=0,
            learning_rate=1e-4,
        )
        trainer = SFTTrainer(model, tokenizer, config, train_dataset=[{"text": t} for t in training_texts(BATCH * steps)],
                             log=lambda line: None)
        trainer.train()
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [BATCH * LENGTH / r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]


def run_trl(steps: int, checkpointing: bool) -> list[float]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from thrifty.loading.default import resolve_model_path

    gguf = resolve_model_path(None)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The same token counts as ours: exactly LENGTH tokens per row.
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:LENGTH] for t in training_texts(BATCH * steps)]
    dataset = Dataset.from_dict({"input_ids": ids})

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.durations: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.durations.append(time.perf_counter() - self.started)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, per_device_train_batch_size=BATCH, max_length=LENGTH, max_steps=steps,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=True,
                         gradient_checkpointing=checkpointing, learning_rate=1e-4, disable_tqdm=True,
                         dataloader_num_workers=0)
        peft_config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[timer])
        trainer.train()
    return timer.durations


def child(label: str, steps: int) -> None:
    engine, checkpointing, quantize = CONFIGS[label]
    if engine == "trl":
        durations = run_trl(steps, checkpointing)
    else:
        durations = run_thrifty(steps, checkpointing, quantize)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"durations": durations, "peak_rss": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (first 2 are warm-up)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    print(f"default model, LoRA r={RANK} all linear layers, batch {BATCH} x {LENGTH} tokens, bf16; "
          f"median step of {args.steps} minus 2 warm-up\n")
    print("| run | tokens/s | s/step | peak RSS | MFU | vs TRL (speed) | vs TRL (RSS) |")
    print("|---|---|---|---|---|---|---|")
    baseline: dict[bool, tuple[float, float]] = {}
    for label in args.configs.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", label, "--steps", str(args.steps)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {label} | failed: {out.stderr.strip().splitlines()[-1]} |||||")
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        step = statistics.median(result["durations"][2:] or result["durations"])
        tokens_per_sec = BATCH * LENGTH / step
        engine, checkpointing, _ = CONFIGS[label]
        flops_per_token = (6 if checkpointing else 4) * N_PARAMS
        mfu = tokens_per_sec * flops_per_token / BF16_ROOFLINE
        rss = result["peak_rss"] / 2**30
        if engine == "trl":
            baseline[checkpointing] = (tokens_per_sec, rss)
        ref = baseline.get(checkpointing)
        speed = f"{tokens_per_sec / ref[0]:.2f}x" if ref else "-"
        memory = f"{rss / ref[1]:.2f}x" if ref else "-"
        print(f"| {label} | {tokens_per_sec:.0f} | {step:.2f} | {rss:.2f} GiB | {mfu:.0%} | {speed} | {memory} |",
              flush=True)


if __name__ == "__main__":
    main()

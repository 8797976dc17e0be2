"""SFT speed and memory: Thrifty vs TRL SFTTrainer + PEFT, same model, data and settings.

Default model, LoRA r=16 (alpha 32, no dropout) on all 7 projections of every layer,
batch 4 x 512 tokens (every row exactly 512 real tokens: no padding on either side),
bf16 weights, AdamW, with and without gradient checkpointing, plus Thrifty QLoRA (nf4).
Each configuration runs in its own subprocess (peak RSS belongs to it alone); the
time of each optimizer step (forward, backward, clipping, AdamW; not data loading or
logging) is measured, the first steps are dropped as warm-up and the median is
reported. "peak RSS" is the whole process (loading included), "train peak RSS" the
peak during train() alone. Run on an otherwise idle machine:

    .venv/bin/python benchmarks/bench_sft.py              # ~15 min
    .venv/bin/python benchmarks/bench_sft.py --quick      # smoke test: 3 steps of 4 x 256
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BATCH, LENGTH = 4, 512
RANK, ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LEARNING_RATE = 1e-4
N_PARAMS = 134.5e6  # SmolLM2-135M, tied embedding counted once (it is the lm_head matmul)
# label -> (engine, gradient checkpointing, quantize)
CONFIGS = {
    "trl-lora": ("trl", False, None),
    "thrifty-lora": ("thrifty", False, None),
    "trl-lora-gc": ("trl", True, None),
    "thrifty-lora-gc": ("thrifty", True, None),
    "thrifty-qlora": ("thrifty", False, "nf4"),
}


def training_texts(count: int, length: int) -> list[str]:
    """Deterministic English-ish texts of `length` words: at least `length` tokens each
    (every word is one token or more), so truncation leaves exactly `length`.

    Both trainers get just one batch worth of rows and go over it once per step: the
    two shuffle differently, so with more rows their batches (and losses) would differ,
    while with these every step is the same 4 rows on both sides and the first losses,
    taken before any update, must agree."""
    import random

    words = ("the model learns from data on a small machine with care and patience while "
             "numbers like 12 and 345 appear in sentences about cats, rivers, code and music").split()
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(length)) for _ in range(count)]


def peak_rss_so_far() -> int | None:
    """VmHWM: the peak RSS since the process started or since reset_peak_rss()."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> int | None:
    """Restart the kernel's peak-RSS counter from the current RSS, so the training
    peak is told apart from the model-loading peak; returns the peak before. Linux
    only (elsewhere nothing is reset and None is returned). This resets getrusage's
    ru_maxrss too, so the process peak must be taken here, not at the end."""
    gc.collect()
    before = peak_rss_so_far()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return before


def run_thrifty(steps: int, length: int, checkpointing: bool, quantize: str | None) -> dict[str, Any]:
    from thrifty import SFTConfig, SFTTrainer, load_model

    model, tokenizer = load_model(None, dtype="bfloat16")
    durations: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, per_device_train_batch_size=BATCH, max_length=length, truncation="truncate",
            max_steps=steps, logging_steps=1, save_steps=0, use_lora=True, lora_r=RANK, lora_alpha=ALPHA,
            lora_dropout=0.0, lora_target_modules=TARGETS, gradient_checkpointing=checkpointing,
            quantize=quantize, disable_tqdm=True, num_sample_prompts=0, learning_rate=LEARNING_RATE,
            weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="linear",
        )
        trainer = SFTTrainer(model, tokenizer, config,
                             train_dataset=[{"text": t} for t in training_texts(BATCH, length)],
                             log=lambda line: None)
        step = trainer.training_step

        def timed_step(batches):  # type: ignore[no-untyped-def]
            # The same span as TRL's on_step_begin..on_step_end: forward, backward,
            # clipping and AdamW, with the batch already built.
            tokens = sum(b.num_tokens for b in batches)
            assert tokens == BATCH * length, f"thrifty step has {tokens} real tokens, not {BATCH * length}"
            started = time.perf_counter()
            result = step(batches)
            durations.append(time.perf_counter() - started)
            return result

        trainer.training_step = timed_step  # type: ignore[method-assign]
        setup_peak = reset_peak_rss()
        trainer.train()
        train_peak = peak_rss_so_far()
        losses = [json.loads(line).get("loss") for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"durations": durations, "setup_peak_rss": setup_peak, "train_peak_rss": train_peak,
            "losses": [x for x in losses if x is not None]}


def run_trl(steps: int, length: int, checkpointing: bool) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from thrifty.formats.default_model import resolve_model_path

    gguf = resolve_model_path(None)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # transformers dequantizes a GGUF into plain bf16 nn.Linear weights but still marks
    # the model as "GGUF-quantized", and Trainer refuses to train such a model. The
    # weights are an ordinary bf16 model, so drop the marker.
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Pre-tokenized, so TRL neither adds EOS nor re-tokenizes: exactly `length` tokens
    # per row, the same tokens Thrifty trains on (both tokenizers come from the GGUF).
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:length] for t in training_texts(BATCH, length)]
    dataset = Dataset.from_dict({"input_ids": ids})

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.durations: list[float] = []
            self.losses: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.durations.append(time.perf_counter() - self.started)

        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        # TRL's SFTConfig defaults gradient_checkpointing to True and bf16 to True (autocast
        # on CPU with use_cpu): both set explicitly so each run does what its label says.
        args = SFTConfig(output_dir=out, per_device_train_batch_size=BATCH, max_length=length, max_steps=steps,
                         logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True,
                         bf16=True, gradient_checkpointing=checkpointing, learning_rate=LEARNING_RATE,
                         lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
                         disable_tqdm=True, dataloader_num_workers=0, packing=False, padding_free=False)
        peft_config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                                 task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[timer])
        lengths = {len(row) for row in trainer.train_dataset["input_ids"]}
        assert lengths == {length}, f"TRL rows have {sorted(lengths)} tokens, not {length}"
        setup_peak = reset_peak_rss()
        trainer.train()
        train_peak = peak_rss_so_far()
    return {"durations": timer.durations, "setup_peak_rss": setup_peak, "train_peak_rss": train_peak,
            "losses": timer.losses}


def child(label: str, steps: int, length: int) -> None:
    engine, checkpointing, quantize = CONFIGS[label]
    if engine == "trl":
        result = run_trl(steps, length, checkpointing)
    else:
        result = run_thrifty(steps, length, checkpointing, quantize)
    peaks = [result["setup_peak_rss"], result["train_peak_rss"]]
    if None in peaks:  # no VmHWM reset here: the process peak is all there is
        from thrifty.training.metrics import peak_rss_bytes

        peaks, result["train_peak_rss"] = [peak_rss_bytes()], None
    print(json.dumps({**result, "peak_rss": max(peaks)}))


def matmul_flops_per_sec(length: int) -> float:
    """Best bf16 matmul throughput on this machine now, for MFU: an MLP-sized product
    ([batch x length, 576] @ [576, 1536]), the shape most of a step's FLOPs have."""
    import torch

    a = torch.randn(BATCH * length, 576, dtype=torch.bfloat16)
    b = torch.randn(576, 1536, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(10):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best


def measure(label: str, steps: int, length: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", label, "--steps", str(steps), "--length", str(length)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or ["no output"]
        return {"error": lines[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--length", type=int, default=LENGTH, help="tokens per row")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--peak-flops", type=float, help="bf16 FLOP/s for MFU (default: measured now)")
    parser.add_argument("--quick", action="store_true", help="3 steps (1 warm-up) of 4 x 256 tokens")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.length = 3, 1, 256
    if args.child:
        child(args.child, args.steps, args.length)
        return
    if args.steps <= args.warmup:
        parser.error("--steps must be more than --warmup")
    peak = args.peak_flops or matmul_flops_per_sec(args.length)
    # Model FLOPs per token for LoRA: forward 2N, backward 2N for the gradient of the
    # activations; the frozen base weights get no gradient (the 2N a full fine-tune
    # spends on them is not done) and the LoRA matmuls are < 4% of N. Recomputation
    # under gradient checkpointing is not useful work, so it does not count (MFU, not
    # hardware utilisation), nor does attention (~6% more at 512 tokens).
    flops_per_token = 4 * N_PARAMS
    print(f"default model, LoRA r={RANK} alpha={ALPHA} on {len(TARGETS)} projections, batch {BATCH} x "
          f"{args.length} tokens, bf16; median of steps {args.warmup + 1}-{args.steps}; MFU at "
          f"{flops_per_token / N_PARAMS:.0f}N FLOPs/token against {peak / 1e9:.0f} GFLOP/s (bf16 matmul)\n")
    print("| run | tokens/s | s/step | peak RSS | train peak RSS | MFU | vs TRL (speed) | vs TRL (RSS) | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    baseline: dict[bool, tuple[float, float]] = {}
    for label in args.configs.split(","):
        result = measure(label, args.steps, args.length)
        if "error" in result:
            print(f"| {label} | failed: {result['error']} ||||||||", flush=True)
            continue
        step = statistics.median(result["durations"][args.warmup:])
        tokens_per_sec = BATCH * args.length / step
        engine, checkpointing, _ = CONFIGS[label]
        mfu = tokens_per_sec * flops_per_token / peak
        rss = result["peak_rss"] / 2**30
        train_rss = f"{result['train_peak_rss'] / 2**30:.2f} GiB" if result.get("train_peak_rss") else "-"
        if engine == "trl":
            baseline[checkpointing] = (tokens_per_sec, rss)
        # QLoRA has no TRL run here: it is compared with TRL's plain LoRA (same checkpointing).
        ref = baseline.get(checkpointing)
        speed = f"{tokens_per_sec / ref[0]:.2f}x" if ref else "-"
        memory = f"{rss / ref[1]:.2f}x" if ref else "-"
        loss = " ".join(f"{x:.3f}" for x in result["losses"][:3])  # same data: first losses should agree
        print(f"| {label} | {tokens_per_sec:.0f} | {step:.2f} | {rss:.2f} GiB | {train_rss} | {mfu:.1%} | {speed} | "
              f"{memory} | {loss} |", flush=True)


if __name__ == "__main__":
    main()

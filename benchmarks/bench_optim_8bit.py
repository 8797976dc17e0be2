"""Full fine-tuning with 8-bit AdamW: Thrifty vs TRL SFTTrainer (bitsandbytes' AdamW8bit),
and each against its own 32-bit AdamW, on the same model, data and settings.

Default model, every weight trained, bf16 weights, batch 2 x 256 tokens (exactly 256 real
tokens per row), gradient checkpointing on both, lr 2e-5 linear. Each run is its own
subprocess (peak RSS is the whole process, loading included); the median step time
leaves out the first two steps. The losses of the 8-bit and 32-bit runs of one trainer
see the same batches, so their difference is what the 8-bit moments change:

    .venv/bin/python benchmarks/bench_optim_8bit.py --steps 100   # ~45 min

TRL runs --trl-steps steps (5: ~80 s a step on a 2-core CPU), enough for its peak and speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_sft import peak_rss_so_far, training_texts  # noqa: E402

BATCH, LENGTH, ROWS = 2, 256, 64
LEARNING_RATE = 2e-5
CONFIGS = {"trl-adamw": ("trl", "adamw_torch"), "trl-adamw-8bit": ("trl", "adamw_8bit"),
           "thrifty-adamw": ("thrifty", "adamw_torch"), "thrifty-adamw-8bit": ("thrifty", "adamw_8bit")}


def run_thrifty(optim: str, steps: int) -> dict[str, Any]:
    from thrifty import SFTConfig, SFTTrainer, load_model

    model, tokenizer = load_model(None, dtype="bfloat16")
    durations: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, per_device_train_batch_size=BATCH, max_length=LENGTH,
                           truncation="truncate", max_steps=steps, logging_steps=1, save_steps=0, use_lora=False,
                           gradient_checkpointing=True, disable_tqdm=True, num_sample_prompts=0,
                           learning_rate=LEARNING_RATE, weight_decay=0.0, max_grad_norm=1.0,
                           lr_scheduler_type="linear", optim=optim, seed=0)
        rows = [{"text": t} for t in training_texts(ROWS, LENGTH)]
        trainer = SFTTrainer(model, tokenizer, config, train_dataset=rows, log=lambda line: None)
        step = trainer.training_step

        def timed_step(batches):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            result = step(batches)
            durations.append(time.perf_counter() - started)
            return result

        trainer.training_step = timed_step  # type: ignore[method-assign]
        trainer.train()
        losses = [json.loads(line).get("loss") for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"durations": durations, "losses": [x for x in losses if x is not None]}


def run_trl(optim: str, steps: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from thrifty.formats.default_model import resolve_model_path

    gguf = resolve_model_path(None)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    model.hf_quantizer, model.is_quantized = None, False  # see bench_sft.py: a plain bf16 model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:LENGTH] for t in training_texts(ROWS, LENGTH)]

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
        args = SFTConfig(output_dir=out, per_device_train_batch_size=BATCH, max_length=LENGTH, max_steps=steps,
                         logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True,
                         bf16=True, gradient_checkpointing=True, learning_rate=LEARNING_RATE,
                         lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0, optim=optim,
                         disable_tqdm=True, dataloader_num_workers=0, packing=False, padding_free=False, seed=0)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids}),
                             processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    return {"durations": timer.durations, "losses": timer.losses}


def child(label: str, steps: int) -> None:
    engine, optim = CONFIGS[label]
    result = (run_trl if engine == "trl" else run_thrifty)(optim, steps)
    print(json.dumps({**result, "peak_rss": peak_rss_so_far()}))


def measure(label: str, steps: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", label, "--steps", str(steps)], capture_output=True,
                         text=True)  # a process of its own: its peak RSS is this run's
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--trl-steps", type=int, default=5)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    print(f"default model, full fine-tuning, bf16, batch {BATCH} x {LENGTH}, checkpointing, {args.steps} steps "
          f"(TRL {args.trl_steps}); median step time of steps 3-\n")
    print("| run | s/step | peak RSS | vs TRL same optim (RSS) | vs TRL same optim (speed) | mean loss, last 10 |")
    print("|---|---|---|---|---|---|")
    results: dict[str, dict[str, Any]] = {}
    for label in args.configs.split(","):
        result = results[label] = measure(label, args.trl_steps if label.startswith("trl") else args.steps)
        if "error" in result:
            print(f"| {label} | failed: {result['error']} |||||", flush=True)
            continue
        step = statistics.median(result["durations"][2:])
        rss = result["peak_rss"] / 2**30
        engine, optim = CONFIGS[label]
        peer = results.get(f"trl-{label.removeprefix('thrifty-')}") if engine == "thrifty" else None
        ratio_rss = f"{rss / (peer['peak_rss'] / 2**30):.2f}x" if peer and "error" not in peer else "-"
        ratio_speed = (f"{statistics.median(peer['durations'][2:]) / step:.2f}x" if peer and "error" not in peer
                       else "-")
        tail = statistics.mean(result["losses"][-10:])
        print(f"| {label} | {step:.2f} | {rss:.2f} GiB | {ratio_rss} | {ratio_speed} | {tail:.4f} |", flush=True)
    for engine in ("trl", "thrifty"):
        a, b = results.get(f"{engine}-adamw"), results.get(f"{engine}-adamw-8bit")
        if a and b and "error" not in a and "error" not in b:
            gaps = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
            print(f"\n{engine}: |loss 8-bit - loss 32-bit| per step: median {statistics.median(gaps):.4f}, "
                  f"max {max(gaps):.4f}; 32-bit losses step to step: median |change| "
                  f"{statistics.median(abs(x - y) for x, y in zip(a['losses'], a['losses'][1:])):.4f}")


if __name__ == "__main__":
    main()

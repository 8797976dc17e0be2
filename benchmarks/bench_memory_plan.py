"""`thrifty plan` against measured peaks: each configuration runs as `thrifty sft|grpo`
(3 optimizer steps, no evaluation or samples) in a process of its own, whose peak RSS
(VmHWM) is compared with the plan the same command prints first.

SFT rows are long enough to fill max_length (the plan counts max_length tokens per row:
shorter data peaks lower). The 1.5B and 7B runs use the Qwen2.5-1.5B- and 7B-shaped
Q4_K_M files bench_gguf_inference.py builds (random weights: memory does not depend on
the values; `--config qwen2.5-7b` builds the 7B one, ~20 min and 19 GB of RAM once).

    .venv/bin/python benchmarks/bench_memory_plan.py            # ~60 min on 2 AVX2 cores
    .venv/bin/python benchmarks/bench_memory_plan.py --only 135m
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_sft import training_texts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "thrifty-bench"
FILES = {"1.5b": CACHE / "qwen2.5-1.5b-random-q4_k_m.gguf", "7b": CACHE / "qwen2.5-7b-random-q4_k_m.gguf"}
SFT_BASE = ["max_steps=3", "logging_steps=1", "save_steps=0", "eval_split=0", "num_sample_prompts=0",
            "eval_on_start=false", "disable_tqdm=true", "max_length=256", "completion_only_loss=false",
            "truncation=truncate"]
GRPO_BASE = ["max_steps=2", "num_eval_samples=0", "save_steps=0", "disable_tqdm=true", "log_completions=0"]
# label -> (kind, size, overrides)
RUNS = {
    "sft lora 8x256": ("sft", "135m", ["per_device_train_batch_size=8"]),
    "sft lora 8x256 ckpt": ("sft", "135m", ["per_device_train_batch_size=8", "gradient_checkpointing=true"]),
    "sft qlora nf4 8x256": ("sft", "135m", ["per_device_train_batch_size=8", "quantize=nf4"]),
    "sft full 4x256": ("sft", "135m", ["per_device_train_batch_size=4", "use_lora=false"]),
    "sft full 8-bit 4x256": ("sft", "135m", ["per_device_train_batch_size=4", "use_lora=false", "optim=adamw_8bit"]),
    "grpo lora arithmetic": ("grpo", "135m", []),
    "grpo lora arithmetic no keep": ("grpo", "135m", ["gradient_checkpointing_keep_mlp=false",
                                                     "gradient_checkpointing_keep_attention=false"]),
    "sft qlora gguf 2x256 ckpt": ("sft", "1.5b", ["per_device_train_batch_size=2", "gradient_checkpointing=true",
                                                 "quantize=gguf"]),
    "sft lora bf16 2x256 ckpt": ("sft", "1.5b", ["per_device_train_batch_size=2", "gradient_checkpointing=true"]),
    "sft qlora gguf 1x512 ckpt": ("sft", "7b", ["per_device_train_batch_size=1", "gradient_checkpointing=true",
                                               "quantize=gguf", "max_length=512"]),
    "grpo qlora gguf 4x4x128": ("grpo", "1.5b", ["quantize=gguf", "per_device_train_batch_size=4",
                                                "gradient_accumulation_steps=4", "num_generations=4",
                                                "max_completion_length=128"]),
}
CHILD = """
import runpy, sys
sys.argv = ["thrifty", *sys.argv[1:]]
from thrifty.cli import main
code = main(sys.argv[1:])
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print("PEAK", int(line.split()[1]) * 1024)
sys.exit(code)
"""


def measure(label: str, data: Path, out: Path) -> tuple[float, float] | str:
    kind, size, overrides = RUNS[label]
    config = REPO / "examples" / ("sft_default.yaml" if kind == "sft" else "grpo_arithmetic.yaml")
    args = [kind, str(config), *(SFT_BASE if kind == "sft" else GRPO_BASE), *overrides, f"output_dir={out}"]
    if kind == "sft":
        args.append(f"train_file={data}")
    if size in FILES:
        args.append(f"model_name_or_path={FILES[size]}")
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["failed"])[-1]
    predicted = re.search(r"predicted peak RSS\s+([\d.]+) GiB", done.stdout)
    peak = re.search(r"^PEAK (\d+)$", done.stdout, re.M)
    if not predicted or not peak:
        return "no plan or peak in the output"
    return float(predicted.group(1)), int(peak.group(1)) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["135m", *FILES])
    parser.add_argument("--runs", help="comma-separated labels of RUNS to measure (default: all)")
    args = parser.parse_args()
    for size, path in FILES.items():
        if args.only in (None, size) and not path.is_file():
            sys.exit(f"{path} is missing: run benchmarks/bench_gguf_inference.py --config qwen2.5-{size} once "
                     "to build it")
    print("| run | model | predicted | measured peak RSS | predicted / measured |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "long.jsonl"
        data.write_text("".join(json.dumps({"prompt": "Continue:", "completion": t}) + "\n"
                                for t in training_texts(64, 600)))
        for index, (label, (_, size, _)) in enumerate(RUNS.items()):
            if (args.only and size != args.only) or (args.runs and label not in args.runs.split(",")):
                continue
            result = measure(label, data, Path(tmp) / f"run{index}")
            if isinstance(result, str):
                print(f"| {label} | {size} | failed: {result} |||", flush=True)
                continue
            predicted, measured = result
            print(f"| {label} | {size} | {predicted:.2f} GiB | {measured:.2f} GiB | {predicted / measured:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()

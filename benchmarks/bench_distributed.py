"""One process vs two under torchrun: wall time, throughput and per-rank peak memory of
the same SFT run (default model, LoRA r=16 on every projection, global batch 8 x 256
tokens), plus what DDP communicates per optimizer step, on paper.

Both launches do the same work (1 x batch 8 = 2 processes x batch 4) on the same data,
interleaved (1, 2, 1, 2, ...) because this VM's speed drifts; each rank reports its own
peak RSS. On a 2-core machine two processes cannot beat one (they split the same cores:
each gets one), so this measures the overhead of the distributed path, not a speed-up.

    .venv/bin/python benchmarks/bench_distributed.py            # ~6 min
    .venv/bin/python benchmarks/bench_distributed.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GLOBAL_BATCH, LENGTH, RANK = 8, 256, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Llama-2-7B's shape, for the on-paper traffic (no weights are loaded).
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)


def texts(count: int, length: int) -> list[dict]:
    import random

    words = ("the model learns from data on a small machine with care and patience while numbers like 12 and "
             "345 appear in sentences about cats, rivers, code and music").split()
    rng = random.Random(0)
    return [{"text": " ".join(rng.choice(words) for _ in range(length))} for _ in range(count)]


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process): train, then write this rank's numbers."""
    import torch

    from thrifty import SFTConfig, SFTTrainer, load_model
    from thrifty.training.metrics import peak_rss_bytes

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    model, tokenizer = load_model()
    config = SFTConfig(output_dir=args.output_dir, per_device_train_batch_size=GLOBAL_BATCH // world,
                       max_length=LENGTH, truncation="truncate", max_steps=args.steps, logging_steps=1, save_steps=0, lora_r=RANK,
                       lora_alpha=2 * RANK, lora_dropout=0.0, lora_target_modules=TARGETS, num_sample_prompts=0,
                       disable_tqdm=True, overwrite_output_dir=True)
    trainer = SFTTrainer(model, tokenizer, config, train_dataset=texts(GLOBAL_BATCH * args.steps, LENGTH),
                         log=lambda _: None)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    report = {"rank": rank, "world": world, "threads": torch.get_num_threads(), "train_seconds": seconds,
              "peak_rss_mb": peak_rss_bytes() / 2**20}
    if rank == 0:
        records = [json.loads(line) for line in Path(args.output_dir, "metrics.jsonl").read_text().splitlines()]
        rates = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r][2:]  # warm-up dropped
        report.update(tokens_per_sec=statistics.median(rates), loss=records[-1]["loss"])
    Path(args.output_dir, f"rank{rank}.json").write_text(json.dumps(report))


def launch(processes: int, steps: int, directory: Path) -> list[dict]:
    script = [str(Path(__file__).resolve()), "--worker", "--steps", str(steps), "--output-dir", str(directory)]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(processes), *script]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return [json.loads(Path(directory, f"rank{r}.json").read_text()) for r in range(processes)]


def lora_parameters(config: dict, rank: int) -> int:
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
    return layers * sum(rank * (a + b) for a, b in shapes)


def full_parameters(config: dict) -> int:
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    embeddings = config["vocab_size"] * h * (1 if config.get("tie_word_embeddings", True) else 2)
    return layers * per_layer + embeddings + h


def traffic_table() -> list[str]:
    """Bytes a rank sends per optimizer step with DDP's ring all-reduce, 2 (N-1)/N times
    the gradients (fp32 LoRA adapters, bf16 full fine-tuning), N = 2 and N -> infinity."""
    from thrifty.formats.loader import load_model

    model, _ = load_model()
    smol = {k: getattr(model.config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_key_value_heads", "vocab_size")}
    lines = ["| model | trainable | parameters | gradient bytes | sent per rank per step (N=2 / N large) |",
             "|---|---|---:|---:|---:|"]
    for name, config in (("SmolLM2-135M", smol), ("Llama-2-7B shape", LLAMA_7B)):
        for kind, params, width in (("LoRA r=16", lora_parameters(config, RANK), 4),
                                    ("full (bf16 grads)", full_parameters(config), 2)):
            size = params * width
            lines.append(f"| {name} | {kind} | {params / 1e6:,.1f} M | {size / 2**20:,.0f} MiB | "
                         f"{size / 2**20:,.0f} / {2 * size / 2**20:,.0f} MiB |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round of 4 steps")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.steps, args.rounds = 4, 1
    runs: dict[int, list[list[dict]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for processes in (1, 2):
                directory = Path(tmp, f"{processes}-{round_}")
                runs[processes].append(launch(processes, args.steps, directory))
                print(f"round {round_ + 1}: {processes} process(es) done", file=sys.stderr)
    print(f"SFT LoRA r={RANK}, default model, global batch {GLOBAL_BATCH} x {LENGTH} tokens, {args.steps} steps, "
          f"{args.rounds} interleaved rounds, {os.cpu_count()} cores\n")
    print("| processes | threads each | train() s (median) | tokens/s (median) | peak RSS per rank | final loss |")
    print("|---:|---:|---:|---:|---:|---:|")
    medians = {}
    for processes, rounds in runs.items():
        seconds = statistics.median(r[0]["train_seconds"] for r in rounds)
        rate = statistics.median(r[0]["tokens_per_sec"] for r in rounds)
        rss = " / ".join(f"{statistics.median(r[k]['peak_rss_mb'] for r in rounds):.0f} MB" for k in range(processes))
        medians[processes] = rate
        print(f"| {processes} | {rounds[0][0]['threads']} | {seconds:.1f} | {rate:,.0f} | {rss} | "
              f"{rounds[-1][0]['loss']:.4f} |")
    print(f"\nthroughput 2 processes / 1 process: {medians[2] / medians[1]:.2f}x\n")
    print("\n".join(traffic_table()))


if __name__ == "__main__":
    main()

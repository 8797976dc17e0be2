"""GRPO rollouts from quantized weights (`rollout_quantization`) against rollouts from the
model's own bf16 weights: the demo (`examples/grpo_arithmetic.yaml`: LoRA, 4 x 8 x 64,
40 steps) run whole, each variant in a process of its own, seeds and variants interleaved.

Per run: held-out accuracy before and after (greedy, 100 unseen problems, evaluated on
the weights the rollouts sample from), the seconds spent generating, the whole run's
peak RSS, and TRL's importance-sampling metrics (mean |logp difference| between the
sampler and the trained weights, mean ratio). Learning is unchanged when the quantized
runs' final accuracies fall within the bf16 runs' spread across seeds.

    .venv/bin/python benchmarks/bench_rollout_quantization.py                 # ~30 min on 2 cores
    .venv/bin/python benchmarks/bench_rollout_quantization.py --seeds 42 --variants none,q8_0
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "grpo_arithmetic.yaml"


def run(variant: str, seed: int, steps: int, directory: Path) -> dict[str, float]:
    out = directory / f"{variant}-{seed}"
    overrides = [f"seed={seed}", f"output_dir={out}", f"max_steps={steps}", "save_steps=0", "disable_tqdm=true"]
    if variant != "none":
        overrides.append(f"rollout_quantization={variant}")
    # GNU time's maximum resident set size of the child: the whole run's peak.
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "thrifty", "grpo", str(DEMO), *overrides]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{variant} seed {seed} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))  # type: ignore
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_accuracy"] for r in records if "eval_accuracy" in r]
    trained = [r for r in records if "reward" in r]
    result = {"before": evals[0], "after": evals[-1], "generation_s": sum(r["time/generation"] for r in trained),
              "training_s": sum(r["time/training"] for r in trained), "wall_s": wall, "peak_gib": peak_kb / 2**20}
    if variant != "none":
        result["logp_diff"] = statistics.fmean(r["sampling/sampling_logp_difference/mean"] for r in trained)
        result["ratio_mean"] = statistics.fmean(r["sampling/importance_sampling_ratio/mean"] for r in trained)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="42,7,11")
    parser.add_argument("--variants", default="none,q8_0,q4_0")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as directory:
        for seed in seeds:
            for variant in variants:  # interleaved: a slow minute of the VM hits every variant alike
                result = run(variant, seed, args.steps, Path(directory))
                results[variant].append(result)
                print(f"{variant} seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()), flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"\n{time.strftime('%Y-%m-%d')}, {cpu}, seeds {seeds}, {args.steps} steps\n")
    print("| rollouts from | held-out accuracy after (per seed) | generation s (median) | speed-up | "
          "peak RSS (median) | mean abs logp difference | mean IS ratio |")
    print("|---|---|---|---|---|---|---|")
    base = statistics.median(r["generation_s"] for r in results[variants[0]])
    for variant, rows in results.items():
        generation = statistics.median(r["generation_s"] for r in rows)
        name = "bf16 weights" if variant == "none" else f"`rollout_quantization: {variant}`"
        diff = f"{statistics.fmean(r['logp_diff'] for r in rows):.4f}" if "logp_diff" in rows[0] else "-"
        ratio = f"{statistics.fmean(r['ratio_mean'] for r in rows):.3f}" if "ratio_mean" in rows[0] else "-"
        accuracies = " / ".join(f"{r['after']:.0%}" for r in rows)
        print(f"| {name} | {accuracies} | {generation:.1f} | "
              f"{base / generation:.2f}x | {statistics.median(r['peak_gib'] for r in rows):.2f} GiB | {diff} | {ratio} |")


if __name__ == "__main__":
    main()

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

`--rollouts MODEL` measures the rollouts alone instead: a GRPO trainer (LoRA r=16 on
every linear layer, as the demo) samples P prompts x G completions of exactly T tokens
(min_completion_length = T) from MODEL (a directory or a .gguf file, loaded into
`--dtype` weights), twice; the second is timed. Each variant in a process of its own
(peak RSS = VmHWM), rounds interleaved:

    .venv/bin/python benchmarks/bench_rollout_quantization.py --rollouts \
        ~/.cache/thrifty-bench/qwen2.5-1.5b-random-q4_k_m.gguf --shape 2x8x64
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


def run(variant: str, seed: int, steps: int, dtype: str | None, directory: Path) -> dict[str, float]:
    out = directory / f"{variant}-{seed}"
    overrides = [f"seed={seed}", f"output_dir={out}", f"max_steps={steps}", "save_steps=0", "disable_tqdm=true"]
    if dtype is not None:
        overrides.append(f"dtype={dtype}")
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


RESULT_MARK = "RESULT "


def rollout_child(model: str, variant: str, shape: str, dtype: str) -> None:
    from thrifty import GRPOConfig, GRPOTrainer, load_model

    prompts, generations, tokens = (int(n) for n in shape.split("x"))
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(model_name_or_path=model, task="arithmetic", num_train_prompts=100, dtype=dtype,
                            output_dir=out,
                            num_generations=generations, per_device_train_batch_size=prompts * generations,
                            max_completion_length=tokens, min_completion_length=tokens, lora_r=16, lora_alpha=32,
                            lora_target_modules="all-linear", num_eval_samples=0, disable_tqdm=True,
                            rollout_quantization=None if variant == "none" else variant)
        loaded, tokenizer = load_model(model, dtype=dtype)
        trainer = GRPOTrainer(loaded, tokenizer, config=config, log=lambda _: None)
        started = time.perf_counter()
        trainer.rollout(list(range(prompts)))  # builds the inference plan
        first = time.perf_counter() - started
        started = time.perf_counter()
        trainer.rollout(list(range(prompts, 2 * prompts)))
        second = time.perf_counter() - started
    peak = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    print(RESULT_MARK + json.dumps({"first_s": first, "rollout_s": second,
                                    "tokens_per_s": prompts * generations * tokens / second,
                                    "peak_gib": peak / 2**20}), flush=True)


def rollouts(args: argparse.Namespace) -> None:
    variants = args.variants.split(",")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for variant in variants:
            done = subprocess.run([sys.executable, __file__, "--rollout-child", variant, "--rollouts", args.rollouts,
                                   "--shape", args.shape, "--dtype", args.dtype or "bfloat16"],
                                  capture_output=True, text=True, cwd=REPO)
            lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
            if done.returncode != 0 or not lines:
                raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
            results[variant].append(json.loads(lines[-1][len(RESULT_MARK):]))
            print(f"round {round_} {variant}: {results[variant][-1]}", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {cpu_name()}, {Path(args.rollouts).name}, {args.shape} "
          f"(prompts x completions x tokens), dtype {args.dtype or 'bfloat16'}, {args.rounds} rounds\n")
    print("| rollouts from | first rollout s (plan built) | rollout s (median) | tokens/s | speed-up | peak RSS |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(r["rollout_s"] for r in results[variants[0]])
    for variant, rows in results.items():
        name = "the weights" if variant == "none" else f"`{variant}` blocks"
        seconds = statistics.median(r["rollout_s"] for r in rows)
        print(f"| {name} | {statistics.median(r['first_s'] for r in rows):.1f} | {seconds:.1f} | "
              f"{statistics.median(r['tokens_per_s'] for r in rows):.0f} | {base / seconds:.2f}x | "
              f"{statistics.median(r['peak_gib'] for r in rows):.2f} GiB |")


def cpu_name() -> str:
    return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="42,7,11")
    parser.add_argument("--variants", default="none,q8_0,q4_0")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rollouts", metavar="MODEL", help="measure rollouts alone, from this model")
    parser.add_argument("--shape", default="4x8x64", help="--rollouts: prompts x completions x tokens")
    parser.add_argument("--rounds", type=int, default=2, help="--rollouts: interleaved rounds")
    parser.add_argument("--rollout-child", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"],
                        help="instead of the demo's bf16 (float32 on CPUs without AVX-512: PyTorch's bf16 "
                             "matmuls are ~50x slower there)")
    args = parser.parse_args()
    if args.rollout_child:
        return rollout_child(args.rollouts, args.rollout_child, args.shape, args.dtype or "bfloat16")
    if args.rollouts:
        return rollouts(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as directory:
        for seed in seeds:
            for variant in variants:  # interleaved: a slow minute of the VM hits every variant alike
                result = run(variant, seed, args.steps, args.dtype, Path(directory))
                results[variant].append(result)
                print(f"{variant} seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()), flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {cpu_name()}, seeds {seeds}, {args.steps} steps, "
          f"dtype {args.dtype or 'bfloat16'}\n")
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
              f"{base / generation:.2f}x | {statistics.median(r['peak_gib'] for r in rows):.2f} GiB | "
              f"{diff} | {ratio} |")


if __name__ == "__main__":
    main()

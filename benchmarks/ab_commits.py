"""Interleaved A/B of two commits on the same workloads: generation, a LoRA SFT step and
a GRPO step on the default model. Each commit is checked out in a temporary worktree;
each measurement is a subprocess importing that worktree's `thrifty`; the commits
alternate, and medians are compared. Run (from the repository):

    .venv/bin/python benchmarks/ab_commits.py OLD_REV NEW_REV --repeats 3 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORKLOAD = r'''
import json, sys, time, tempfile
import torch
torch.manual_seed(0)
from thrifty.formats.loader import load_model
from thrifty.generation.engine import generate_tokens, render_prompt
from thrifty.generation.sampling import SamplingParams
dtype, only = sys.argv[1], sys.argv[2]
model, tokenizer = load_model(None, dtype=dtype)
prompts = [render_prompt(tokenizer, f"Tell me about the number {i}.", True, None) for i in range(16)]
generate_tokens(model, prompts[:2], max_new_tokens=4, sampling=SamplingParams())
start = time.perf_counter()
generate_tokens(model, prompts, max_new_tokens=64, sampling=SamplingParams(temperature=1.0), seed=0, stop_token_ids=[])
generation = time.perf_counter() - start
if only == "generation":
    print(json.dumps({"generation_s": generation}))
    sys.exit(0)
from thrifty.sft.config import SFTConfig
from thrifty.sft.trainer import SFTTrainer
rows = [{"prompt": f"What is {i} + {i}?", "completion": f"Answer: {2 * i}"} for i in range(64)]
with tempfile.TemporaryDirectory() as out:
    config = SFTConfig(dtype=dtype, max_steps=3, per_device_train_batch_size=8, save_steps=0, output_dir=out,
                       disable_tqdm=True, sample_prompts=[], num_sample_prompts=0)
    start = time.perf_counter()
    SFTTrainer(load_model(None, dtype=dtype)[0], tokenizer, config, train_dataset=rows, log=lambda _: None).train()
    sft = (time.perf_counter() - start) / 3
from thrifty.grpo.config import GRPOConfig
from thrifty.grpo.trainer import GRPOTrainer
with tempfile.TemporaryDirectory() as out:
    config = GRPOConfig(dtype=dtype, task="arithmetic", num_train_prompts=64, max_steps=2, num_generations=8,
                        per_device_train_batch_size=32, max_completion_length=32, save_steps=0, output_dir=out,
                        disable_tqdm=True, num_eval_samples=0)
    start = time.perf_counter()
    GRPOTrainer(load_model(None, dtype=dtype)[0], tokenizer, config=config, log=lambda _: None).train()
    grpo = (time.perf_counter() - start) / 2
print(json.dumps({"generation_s": generation, "sft_step_s": sft, "grpo_step_s": grpo}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--only", choices=["all", "generation"], default="all")
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for label, rev in (("old", args.old), ("new", args.new)):
            trees[label] = Path(tmp) / label
            subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(trees[label]), rev], check=True,
                           capture_output=True)
        try:
            results: dict[str, list[dict]] = {"old": [], "new": []}
            for _ in range(args.repeats):
                for label in ("old", "new"):
                    done = subprocess.run([sys.executable, "-c", WORKLOAD, args.dtype, args.only], capture_output=True, text=True,
                                          cwd=tmp, env={"PYTHONPATH": str(trees[label] / "src"), "PATH": "/usr/bin:/bin"},
                                          timeout=3600)
                    if done.returncode != 0:
                        raise RuntimeError(f"{label}: {done.stderr[-3000:]}")
                    results[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], capture_output=True)
    print(f"{args.old} -> {args.new}, {args.dtype}, medians of {args.repeats} interleaved runs:")
    print("| workload | old (s) | new (s) | new / old |")
    print("|---|---|---|---|")
    for key in results["old"][0]:
        old = statistics.median(r[key] for r in results["old"])
        new = statistics.median(r[key] for r in results["new"])
        print(f"| {key} | {old:.2f} | {new:.2f} | {new / old:.2f}x |")


if __name__ == "__main__":
    main()

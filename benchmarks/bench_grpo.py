"""GRPO step speed and memory: Thrifty vs TRL GRPOTrainer + PEFT (no vLLM), same run.

Default model (SmolLM2-135M-Instruct), LoRA r=16 alpha=32 on all linear layers, bf16
weights, on the built-in arithmetic task: the same 4 prompts every step on both engines,
the task's reward functions and weights, temperature 1.0, beta 0, loss_type "dapo",
learning rate 1e-5, one micro-batch (no gradient accumulation), one optimizer update
per step. Gradient checkpointing is off unless --gradient-checkpointing, set explicitly
on both (both libraries now default to on). Two shapes: 4 prompts x 8 completions of at
most 64 new tokens, and 4 x 4 of at most 128. TRL gets the model from the same GGUF
file, unpacked to dense bf16 weights as Thrifty does.

Each engine + shape runs in its own subprocess, so peak RSS belongs to it alone. The
first step is warm-up and dropped; medians of the rest are reported, for the whole step
and its split into generation, scoring (reward functions) and training (the rest of the
step: log-probs, loss, backward, optimizer). TRL's split comes from timing wrappers
around its `_generate` and `_calculate_rewards`, and the step from a TrainerCallback;
Thrifty's from the time/* keys of its metrics.jsonl.

Both engines stop a completion at EOS, so completion lengths are sampled and differ run
to run and engine to engine: step times compare similar, not identical, work. The
tokens/step column (completion tokens incl. EOS, mean over the measured steps) shows
how much each engine generated, and gen tokens/s (those tokens / generation time) is
the fairer per-token comparison of generation. With --fixed-length no completion may
end before the max tokens (Thrifty's min_completion_length, transformers'
min_new_tokens): both engines then do the same work per step. Run:

    .venv/bin/python benchmarks/bench_grpo.py              # 4 steps per run
    .venv/bin/python benchmarks/bench_grpo.py --steps 6    # less noisy
    .venv/bin/python benchmarks/bench_grpo.py --fixed-length  # the same tokens per step on both
    .venv/bin/python benchmarks/bench_grpo.py --quick      # smoke test: 2 steps, 1/4 of the tokens
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
from typing import Any

PROMPTS, RANK, ALPHA, LEARNING_RATE = 4, 16, 32, 1e-5
# label -> (completions per prompt, max new tokens)
SHAPES = {"4x8x64": (8, 64), "4x4x128": (4, 128)}
ENGINES = ("trl", "thrifty")
SPLIT = ("generation", "scoring", "training")
RESULT_MARK = "BENCH_RESULT "  # the child's result line, told apart from the trainers' own output


def task_rows() -> list[dict[str, Any]]:
    """The same 4 arithmetic prompts (chat messages + answer) for every step of both engines."""
    from thrifty.grpo.tasks import get_task

    return get_task("arithmetic").rows("train", PROMPTS, seed=0)


def run_thrifty(generations: int, new_tokens: int, steps: int, checkpointing: bool,
                fixed_length: bool) -> list[dict[str, float]]:
    from thrifty import GRPOConfig, GRPOTrainer, load_model

    model, tokenizer = load_model(None, dtype="bfloat16")
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            task="arithmetic", output_dir=out, per_device_train_batch_size=PROMPTS * generations,
            gradient_accumulation_steps=1, num_generations=generations,
            max_completion_length=new_tokens, temperature=1.0, beta=0.0, loss_type="dapo",
            learning_rate=LEARNING_RATE, max_steps=steps, lora_r=RANK, lora_alpha=ALPHA,
            lora_target_modules="all-linear", num_eval_samples=0, eval_on_start=False, save_steps=0,
            log_completions=0, logging_steps=1, disable_tqdm=True, gradient_checkpointing=checkpointing,
            min_completion_length=new_tokens if fixed_length else 0,
        )
        # train_dataset: the task's reward functions and weights still apply (reward_funcs=None).
        trainer = GRPOTrainer(model, tokenizer, train_dataset=task_rows(), config=config, log=lambda line: None)
        trainer.train()
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = PROMPTS * generations
    return [{"step": r["time/step"], **{k: r[f"time/{k}"] for k in SPLIT},
             "tokens": r["completions/mean_length"] * rows} for r in records if "time/step" in r]


def run_trl(generations: int, new_tokens: int, steps: int, checkpointing: bool,
            fixed_length: bool) -> list[dict[str, float]]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from thrifty.formats.default_model import resolve_model_path
    from thrifty.grpo.tasks import get_task

    gguf = resolve_model_path(None)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize: recent transformers otherwise keeps the GGUF blocks packed, which its
    # Trainer refuses to train; Thrifty too trains on the unpacked bf16 weights.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True))
    task = get_task("arithmetic")

    # Seconds and tokens of the step in progress, filled by the wrappers below.
    current: dict[str, float] = {}
    records: list[dict[str, float]] = []

    class StepTimer(TrainerCallback):
        # Generation runs inside training_step, i.e. between these two hooks.
        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            current.clear()
            current.update(generation=0.0, scoring=0.0, tokens=0.0, started=time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            step = time.perf_counter() - current["started"]
            records.append({"step": step, "generation": current["generation"], "scoring": current["scoring"],
                            "training": step - current["generation"] - current["scoring"],
                            "tokens": current["tokens"]})

    with tempfile.TemporaryDirectory() as out:
        # The same batch fields as Thrifty's run (they mean the same in both): one generation
        # of 4 prompts x G completions and one optimizer update per step.
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=PROMPTS * generations, gradient_accumulation_steps=1,
            num_generations=generations, max_completion_length=new_tokens, temperature=1.0, top_p=1.0, top_k=0,
            beta=0.0, loss_type="dapo", reward_weights=task.reward_weights(), learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant", adam_beta2=0.99, max_grad_norm=1.0,  # Thrifty's defaults
            max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=True,
            disable_tqdm=True, dataloader_num_workers=0, seed=42,
            gradient_checkpointing=checkpointing,
            generation_kwargs={"min_new_tokens": new_tokens} if fixed_length else None,
        )
        peft_config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
        trainer = GRPOTrainer(model=model, reward_funcs=task.reward_funcs(), args=args,
                              train_dataset=Dataset.from_list(task_rows()), processing_class=tokenizer,
                              peft_config=peft_config, callbacks=[StepTimer()])
        generate, rewards = trainer._generate, trainer._calculate_rewards

        # Instance attributes shadow the methods: TRL calls them as self._generate(...).
        def timed_generate(*a: Any, **kw: Any) -> Any:
            started = time.perf_counter()
            output = generate(*a, **kw)
            current["generation"] += time.perf_counter() - started
            current["tokens"] += sum(len(ids) for ids in output[1])  # completion_ids, EOS included
            return output

        def timed_rewards(*a: Any, **kw: Any) -> Any:
            started = time.perf_counter()
            output = rewards(*a, **kw)
            current["scoring"] += time.perf_counter() - started
            return output

        trainer._generate, trainer._calculate_rewards = timed_generate, timed_rewards
        trainer.train()
    return records


def child(args: argparse.Namespace) -> None:
    generations, new_tokens = SHAPES[args.shape]
    runner = run_thrifty if args.engine == "thrifty" else run_trl
    steps = runner(generations, new_tokens // args.token_divisor, args.steps, args.gradient_checkpointing,
                   args.fixed_length)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(RESULT_MARK + json.dumps({"steps": steps, "peak_rss": peak_rss}), flush=True)


def measure(engine: str, shape: str, steps: int, token_divisor: int, checkpointing: bool, fixed_length: bool) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--engine", engine, "--shape", shape, "--steps", str(steps),
         "--token-divisor", str(token_divisor), *(["--gradient-checkpointing"] if checkpointing else []),
         *(["--fixed-length"] if fixed_length else [])],
        capture_output=True, text=True,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{engine} {shape} failed (exit {out.returncode}): {tail}")
    return json.loads(lines[-1][len(RESULT_MARK):])


def summarise(result: dict) -> dict[str, float]:
    """Medians over the steps after the warm-up step (all steps if there is only one)."""
    steps = result["steps"][1:] or result["steps"]
    out = {key: statistics.median(s[key] for s in steps) for key in ("step", *SPLIT)}
    # Tokens/s over the same steps as a ratio of sums: steps with longer completions weigh more.
    out["tokens_per_sec"] = sum(s["tokens"] for s in steps) / sum(s["generation"] for s in steps)
    out["mean_length"] = statistics.mean(s["tokens"] for s in steps)
    out["peak_rss"] = result["peak_rss"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=ENGINES)
    parser.add_argument("--shape", choices=list(SHAPES), default="4x8x64")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shapes to run")
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps per run (the first is warm-up)")
    parser.add_argument("--token-divisor", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both engines (default: off)")
    parser.add_argument("--fixed-length", action="store_true",
                        help="no EOS before the max tokens on both engines (min_completion_length / min_new_tokens): "
                             "the same work per step")
    parser.add_argument("--quick", action="store_true", help="2 steps, a quarter of the new tokens")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.quick:
        args.steps, args.token_divisor = 2, 4

    print(f"default model, LoRA r={RANK} all linear layers, bf16, arithmetic task, temperature 1.0, beta 0, dapo; "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
          f"{'every completion max tokens long (no EOS before)' if args.fixed_length else 'completions stop at EOS'}; "
          f"median of {args.steps} steps minus 1 warm-up\n")
    print("| shape (prompts x completions x max tokens) | engine | s/step | generation | scoring | training | "
          "tokens/step | gen tokens/s | peak RSS | TRL/Thrifty time | Thrifty/TRL RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        generations, new_tokens = SHAPES[shape]
        label = f"{PROMPTS} x {generations} x {new_tokens // args.token_divisor}"
        results: dict[str, dict[str, float]] = {}
        for engine in ENGINES:  # TRL first: Thrifty's ratios need its numbers
            try:
                results[engine] = r = summarise(measure(engine, shape, args.steps, args.token_divisor,
                                                         args.gradient_checkpointing, args.fixed_length))
            except RuntimeError as e:
                print(f"| {label} | {engine} | failed: {e} |||||||||", flush=True)
                continue
            trl = results.get("trl")
            speed = f"{trl['step'] / r['step']:.2f}x" if engine == "thrifty" and trl else "-"
            memory = f"{r['peak_rss'] / trl['peak_rss']:.2f}x" if engine == "thrifty" and trl else "-"
            print(f"| {label} | {engine} | {r['step']:.2f} | {r['generation']:.2f} | {r['scoring']:.3f} | "
                  f"{r['training']:.2f} | {r['mean_length']:.0f} | {r['tokens_per_sec']:.0f} | "
                  f"{r['peak_rss'] / 2**30:.2f} GiB | {speed} | {memory} |", flush=True)


if __name__ == "__main__":
    main()

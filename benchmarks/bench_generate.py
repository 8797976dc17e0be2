"""Generation speed: Thrifty vs Hugging Face transformers, same model, dtype and prompts.

Each measurement runs in its own subprocess so peak RSS belongs to one engine only.
Both engines generate exactly --new-tokens tokens per row (EOS ignored), so tokens/s
compares the same work. Run:

    .venv/bin/python benchmarks/bench_generate.py            # full table (~10 min)
    .venv/bin/python benchmarks/bench_generate.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
    "What is 17 * 23?", "Give me three tips for better sleep.", "Translate 'good morning' to Spanish.",
    "Why is the sky blue?", "Write a limerick about a cat.", "What is a prime number?",
    "Summarise the plot of Cinderella.", "Name five fruits.", "How do I boil an egg?",
    "What does a CPU do?", "Describe a rainbow.", "What is the speed of light?", "Tell me a joke.",
]
# (label, distinct prompts, samples per prompt): "16 x 1" is 16 different prompts;
# "2 x 8" is a GRPO-style batch where each prompt is sampled 8 times.
SHAPES = {"b16": (16, 1), "b1": (1, 1), "grpo": (2, 8)}


def run_ours(prompts: int, samples: int, new_tokens: int, repeats: int) -> list[float]:
    from thrifty import load_model
    from thrifty.generation.engine import generate_tokens, render_prompt
    from thrifty.generation.sampling import SamplingParams

    model, tokenizer = load_model(None, dtype="bfloat16")
    ids = [render_prompt(tokenizer, p, chat=True, system_prompt=None) for p in PROMPTS[:prompts]]
    sampling = SamplingParams(temperature=1.0)
    times = []
    for i in range(repeats + 1):  # the first run warms up allocator and caches
        start = time.perf_counter()
        generate_tokens(model, ids, max_new_tokens=new_tokens, sampling=sampling,
                        num_return_sequences=samples, seed=i, stop_token_ids=[])
        times.append(time.perf_counter() - start)
    return times[1:]


def run_transformers(prompts: int, samples: int, new_tokens: int, repeats: int) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from thrifty.formats.default_model import resolve_model_path

    gguf = resolve_model_path(None)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Dense bf16 weights, as Thrifty uses (the GGUF is Q4_1; transformers could keep it packed).
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True)).eval()
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS[:prompts]]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    times = []
    for i in range(repeats + 1):
        torch.manual_seed(i)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id)
        times.append(time.perf_counter() - start)
    return times[1:]


def child(args: argparse.Namespace) -> None:
    prompts, samples = SHAPES[args.shape]
    runner = run_ours if args.engine == "thrifty" else run_transformers
    times = runner(prompts, samples, args.new_tokens, args.repeats)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"times": times, "peak_rss": peak_rss}))


def measure(engine: str, shape: str, new_tokens: int, repeats: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--engine", engine, "--shape", shape,
         "--new-tokens", str(new_tokens), "--repeats", str(repeats)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=["thrifty", "transformers"])
    parser.add_argument("--shape", choices=list(SHAPES), default="b16")
    parser.add_argument("--shapes", default="b16,b1,grpo", help="comma-separated shapes to run")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 64 new tokens")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.quick:
        args.repeats, args.new_tokens = 1, 64

    print(f"bf16, sampling at temperature 1.0, {args.new_tokens} new tokens per row, "
          f"median of {args.repeats} runs after a warm-up\n")
    print("| batch | engine | tokens/s | ms/step | peak RSS | speed-up |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        prompts, samples = SHAPES[shape]
        rows = prompts * samples
        label = f"{rows} ({prompts} prompt{'s' if prompts > 1 else ''} x {samples})"
        results = {}
        for engine in ("transformers", "thrifty"):
            r = measure(engine, shape, args.new_tokens, args.repeats)
            seconds = statistics.median(r["times"])
            results[engine] = seconds
            speedup = results["transformers"] / seconds
            print(f"| {label} | {engine} | {rows * args.new_tokens / seconds:.0f} | "
                  f"{seconds / args.new_tokens * 1000:.1f} | {r['peak_rss'] / 2**30:.2f} GiB | "
                  f"{speedup:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

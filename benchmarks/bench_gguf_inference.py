"""Chat from a Q4_K_M GGUF file: Thrifty (the file's own blocks, and bf16 copies of them)
against llama.cpp (llama-cpp-python) on the same file and prompt, 2 threads each.

The model file has the exact configuration of a real model and random weights (memory
and speed do not depend on the values); it is built once (Thrifty's exporter writes the
f16 file, llama.cpp's quantizer makes it Q4_K_M, the same bytes Thrifty's own quantizer
writes, only faster) and cached outside the repository (--cache-dir). The tokenizer is the default model's,
padded to the configuration's vocabulary as llama.cpp's converter pads. Each measurement
is its own subprocess (peak RSS belongs to one engine), engines interleaved, medians of
--repeats. Every engine decodes exactly --new-tokens tokens, greedily, after the same
prompt tokens. Run:

    .venv/bin/python benchmarks/bench_gguf_inference.py                  # Qwen2.5-1.5B shape
    .venv/bin/python benchmarks/bench_gguf_inference.py --repeats 1      # quicker
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Exact configurations of the real models (their config.json), random weights.
CONFIGS = {
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, head_dim=128, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True,
                         attention_bias=True, model_type="qwen2"),
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                         rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
                         model_type="llama"),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=False,
                       attention_bias=True, model_type="qwen2"),
}
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def model_file(name: str, cache_dir: Path) -> Path:
    """The cached Q4_K_M file of configuration `name`, written on first use."""
    path = cache_dir / f"{name}-random-q4_k_m.gguf"
    if path.is_file():
        return path
    import torch

    from thrifty.formats.default_model import DEFAULT_MODEL_NAME
    from thrifty.formats.gguf_export import export_gguf
    from thrifty.formats.loader import load_model
    from thrifty.model.config import ModelConfig
    from thrifty.model.decoder import CausalLM, rope_inverse_frequencies

    _, tokenizer = load_model(DEFAULT_MODEL_NAME, dtype="float32", quantize="gguf")
    config = ModelConfig(**CONFIGS[name], bos_token_id=tokenizer.bos_token_id,
                         eos_token_ids=list(tokenizer.stop_token_ids), pad_token_id=tokenizer.pad_token_id)
    print(f"building {path} (random weights, once)...", file=sys.stderr, flush=True)
    with torch.device("meta"):
        model = CausalLM(config)
    generator = torch.Generator().manual_seed(0)
    for module_name, module in list(model.named_modules()):
        for attr, param in list(module.named_parameters(recurse=False)):
            value = (torch.ones(param.shape) if "norm" in attr or "norm" in module_name
                     else torch.randn(param.shape, generator=generator) * 0.02).to(torch.bfloat16)
            setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inverse_frequencies(config)
    cache_dir.mkdir(parents=True, exist_ok=True)
    f16 = export_gguf(model, tokenizer, cache_dir / f"{name}-random-f16.gguf", "f16", progress=True)
    del model
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    temporary = path.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(temporary).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError("llama.cpp could not quantize the f16 file")
    temporary.rename(path)
    f16.unlink()
    return path


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss would keep the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_thrifty(path: str, new_tokens: int, quantize: str | None) -> dict:
    import torch

    from thrifty.formats.loader import load_model
    from thrifty.generation.engine import generate_tokens, render_prompt
    from thrifty.generation.sampling import SamplingParams

    torch.set_num_threads(2)
    started = time.perf_counter()
    model, tokenizer = load_model(path, dtype="bfloat16", quantize=quantize)
    loaded = time.perf_counter()
    ids = render_prompt(tokenizer, PROMPT, chat=False, system_prompt=None)
    steps: list[float] = []
    tokens, _ = generate_tokens(model, [ids], max_new_tokens=new_tokens, sampling=SamplingParams(),
                                stop_token_ids=[], on_step=lambda rows, toks: steps.append(time.perf_counter()))
    done = time.perf_counter()
    assert len(tokens[0]) == new_tokens
    decode = (steps[-1] - steps[0]) / (len(steps) - 1)  # per token after the first (prefill)
    return {"load_s": loaded - started, "total_s": done - started, "decode_tok_s": 1 / decode,
            "prompt_tokens": len(ids), "peak_rss_mb": peak_rss_mb()}


def run_llama_cpp(path: str, new_tokens: int) -> dict:
    from llama_cpp import Llama

    started = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
    loaded = time.perf_counter()
    ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    steps = []
    for _ in llm.generate(ids, top_k=1, temp=0.0):  # greedy; runs until we stop it (no EOS stop)
        steps.append(time.perf_counter())
        if len(steps) == new_tokens:
            break
    done = time.perf_counter()
    decode = (steps[-1] - steps[0]) / (len(steps) - 1)
    return {"load_s": loaded - started, "total_s": done - started, "decode_tok_s": 1 / decode,
            "prompt_tokens": len(ids), "peak_rss_mb": peak_rss_mb()}


ENGINES = {
    "thrifty (GGUF blocks)": lambda path, n: run_thrifty(path, n, "gguf"),
    "thrifty (bf16 copy)": lambda path, n: run_thrifty(path, n, None),
    "llama.cpp": run_llama_cpp,
}


def measure(engine: str, path: Path, new_tokens: int) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_gguf_inference as b; "
            f"print(json.dumps(b.ENGINES[{engine!r}]({str(path)!r}, {new_tokens})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="qwen2.5-1.5b", choices=sorted(CONFIGS))
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "thrifty-bench")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of: " + ", ".join(ENGINES))
    args = parser.parse_args()
    path = model_file(args.config, args.cache_dir)
    engines = args.engines.split(",")
    results: dict[str, list[dict]] = {e: [] for e in engines}
    for _ in range(args.repeats):  # interleaved: each round runs every engine once
        for engine in engines:
            results[engine].append(measure(engine, path, args.new_tokens))
    print(f"{args.config}, Q4_K_M ({path.stat().st_size / 2**30:.2f} GiB), prompt {results[engines[0]][0]['prompt_tokens']} "
          f"tokens + {args.new_tokens} new, 2 threads, medians of {args.repeats}:")
    print(f"| engine | peak RSS (GiB) | load (s) | load + {args.new_tokens} tokens (s) | decode (tokens/s) |")
    print("|---|---|---|---|---|")
    med = {e: {k: statistics.median(r[k] for r in results[e]) for k in results[e][0]} for e in engines}
    for engine in engines:
        m = med[engine]
        print(f"| {engine} | {m['peak_rss_mb'] / 1024:.2f} | {m['load_s']:.1f} | {m['total_s']:.1f} | "
              f"{m['decode_tok_s']:.1f} |")
    if "llama.cpp" in med and "thrifty (GGUF blocks)" in med:
        ours, theirs = med["thrifty (GGUF blocks)"], med["llama.cpp"]
        print(f"thrifty (GGUF blocks) / llama.cpp: peak RSS {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x, "
              f"wall time {ours['total_s'] / theirs['total_s']:.2f}x, decode speed "
              f"{ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x")
    if "thrifty (bf16 copy)" in med and "thrifty (GGUF blocks)" in med:
        print(f"decoding from blocks / from bf16: "
              f"{med['thrifty (GGUF blocks)']['decode_tok_s'] / med['thrifty (bf16 copy)']['decode_tok_s']:.2f}x")


if __name__ == "__main__":
    main()

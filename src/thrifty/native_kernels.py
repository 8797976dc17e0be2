"""Thrifty's C++ kernels (src/thrifty/native/), compiled once for this machine's CPU.

`scripts/install.sh` builds them; otherwise the first use does (~40 s with g++).
Each build lives in the Python environment (`<sys.prefix>/var/thrifty-native`), and
PyTorch's extension loader rebuilds it when the source or the torch version changes.
Where a kernel cannot be built or this CPU lacks what it needs, callers get None and
use PyTorch's kernels instead: same results, slower. THRIFTY_NATIVE=0 forces that.

    python -m thrifty.native_kernels    # build now and report what is available
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "native"


def build_directory() -> Path:
    override = os.environ.get("THRIFTY_NATIVE_BUILD_DIR")
    root = Path(override) if override else Path(sys.prefix) / "var" / "thrifty-native"
    return root / f"torch-{torch.__version__}"


@functools.cache
def attention_backward() -> ModuleType | None:
    """The module of native/attention_backward.cpp, or None where it cannot run."""
    if os.environ.get("THRIFTY_NATIVE") == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        module = _build("thrifty_attention_backward", SOURCE_DIR / "attention_backward.cpp")
    except Exception as error:  # no compiler, old torch headers, ...: fall back, say why
        warnings.warn(f"Thrifty's native attention backward could not be built ({error}); "
                      "training uses PyTorch's slower flash-attention backward instead.", stacklevel=2)
        return None
    return module if module.available() else None


def _build(name: str, source: Path) -> ModuleType:
    from torch.utils.cpp_extension import load

    directory = build_directory() / name
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # -march=native: the build is for this machine only (it lives in its environment).
    # -fopenmp compiles at::parallel_for's OpenMP loop; the runtime is the libgomp torch
    # has already loaded, so nothing extra is linked.
    module = load(name=name, sources=[str(source)], build_directory=str(directory),
                  extra_cflags=["-O3", "-march=native", "-fopenmp",
                                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"])
    elapsed = time.perf_counter() - started
    if elapsed > 5:
        log.info("built native kernel %s in %.0f s", name, elapsed)
    return module


def main() -> None:
    started = time.perf_counter()
    module = attention_backward()
    state = "available" if module is not None else "not available on this machine (PyTorch's kernel is used)"
    print(f"native attention backward: {state} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()

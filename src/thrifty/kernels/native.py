"""Thrifty's C++ kernels (kernels/csrc/, kernels/portable_csrc/), compiled once for this machine's CPU.

`scripts/install.sh` builds them; otherwise the first use does (~40 s with g++).
Each build lives in the Python environment (`<sys.prefix>/var/thrifty-native`), and
PyTorch's extension loader rebuilds it when the source or the torch version changes.
Where a kernel cannot be built or this CPU lacks what it needs, callers get None and
use PyTorch's kernels instead: same results, slower. THRIFTY_NATIVE=0 forces that.
The kernels of csrc/ need AVX-512 BF16. Where the CPU also has AMX, the attention and
decoding matmuls run on it; THRIFTY_NATIVE_AMX=0 makes them use their AVX-512 BF16
versions. The portable kernels (portable_csrc/, a module of their own: GGUF blocks, the
8-bit AdamW step) are plain C++ that the compiler vectorizes for any CPU, AVX2 or AVX-512.

    python -c "import thrifty.kernels.native as n; n.main()"   # build now, report what runs

Every caller asks `native_kernel(name)`; THRIFTY_NATIVE_OFF=name,... switches single
kernels off.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE_DIR = Path(__file__).parent / "csrc"  # *.cpp compile into one module
PORTABLE_SOURCE_DIR = Path(__file__).parent / "portable_csrc"  # and these into another, for any CPU


def build_directory() -> Path:
    override = os.environ.get("THRIFTY_NATIVE_BUILD_DIR")
    root = Path(override) if override else Path(sys.prefix) / "var" / "thrifty-native"
    return root / f"torch-{torch.__version__}"


@functools.cache
def native_module() -> ModuleType | None:
    """The compiled module (module.cpp), or None where its kernels cannot run."""
    if os.environ.get("THRIFTY_NATIVE") == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        module = build_module("thrifty_native", SOURCE_DIR)
    except Exception as error:  # no compiler, other torch headers, ...: fall back, say why
        warnings.warn(f"Thrifty's native kernels could not be built ({error}); "
                      "training uses PyTorch's slower ops instead.", stacklevel=2)
        return None
    return module if module.avx512_bf16() else None


@functools.cache
def portable_module() -> ModuleType | None:
    """The compiled portable kernels (portable_csrc/), or None where they cannot be built."""
    if os.environ.get("THRIFTY_NATIVE") == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        return build_module("thrifty_portable", PORTABLE_SOURCE_DIR)
    except Exception as error:
        warnings.warn(f"Thrifty's portable kernels could not be built ({error}); quantized GGUF weights are "
                      "dequantized by numpy and 8-bit AdamW runs in PyTorch instead (slow).", stacklevel=2)
        return None


# The native kernels by name: what native_kernel() and THRIFTY_NATIVE_OFF take.
KERNELS = ("attention_forward", "attention_backward", "token_log_probs", "elementwise", "decode_linear",
           "decode_attention", "sampling", "gguf_blocks", "adamw_8bit", "bf16_matvec")
PORTABLE_KERNELS = ("gguf_blocks", "adamw_8bit", "bf16_matvec")  # in portable_module(), for any CPU


def native_kernel(name: str) -> ModuleType | None:
    """The compiled module if kernel `name` (one of KERNELS) runs here, else None: the one
    question every caller asks before taking a native path, answered here only.

    THRIFTY_NATIVE_OFF=name[,name...] switches single kernels off (PyTorch's ops run
    instead), to find which one is wrong when results look wrong, or to compare them.
    """
    if name not in KERNELS:
        raise ValueError(f"unknown native kernel {name!r}; the kernels are {', '.join(KERNELS)}")
    switched_off = os.environ.get("THRIFTY_NATIVE_OFF")
    if switched_off and name in switched_off.split(","):
        return None
    return portable_module() if name in PORTABLE_KERNELS else native_module()


def build_module(name: str, source_dir: Path) -> ModuleType:
    """The module compiled from the *.cpp files of `source_dir`, built once per version of
    its sources (*.cpp and *.h).

    A finished build is a directory named for the sources' hash holding the .so, which
    is then only loaded. A build runs in a directory of its own process and is renamed into
    place when complete: a compile interrupted by Ctrl-C or kill leaves a temporary
    directory that no later process waits on (PyTorch's loader, building in place, left a
    lock file behind that made every later process wait forever)."""
    # Headers included, which PyTorch's loader does not hash: an edit never reuses a stale build.
    files = sorted(path for path in source_dir.iterdir() if path.suffix in (".cpp", ".h"))
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()
    final = build_directory() / f"{name}-{digest[:12]}"
    if (final / f"{name}.so").is_file():
        return _load_built(name, final / f"{name}.so")
    _remove_abandoned_builds(final.parent)
    temporary = final.parent / f".{final.name}.building-{os.getpid()}"
    temporary.mkdir(parents=True, exist_ok=True)
    print(f"Compiling Thrifty's native kernels for this CPU (once, ~40 s) in {final} ...", file=sys.stderr,
          flush=True)
    started = time.perf_counter()
    from torch.utils.cpp_extension import load

    # -march=native: the build is for this machine only (it lives in its environment).
    # -fopenmp compiles at::parallel_for's OpenMP loop; the runtime is the libgomp torch
    # has already loaded, so nothing extra is linked.
    try:
        module = load(name=name, sources=[str(path) for path in files if path.suffix == ".cpp"],
                      build_directory=str(temporary),
                      extra_cflags=["-O3", "-march=native", "-fopenmp",
                                    "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"])
        if final.exists() and not (final / f"{name}.so").is_file():
            shutil.rmtree(final, ignore_errors=True)  # an older, unfinished build made in place
        try:
            temporary.rename(final)
        except OSError:  # another process finished the same build first: keep its copy
            shutil.rmtree(temporary, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    print(f"Native kernels ready ({time.perf_counter() - started:.0f} s).", file=sys.stderr, flush=True)
    return module


def _load_built(name: str, library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, library)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _remove_abandoned_builds(directory: Path) -> None:
    """Temporary build directories whose process is gone (an interrupted compile)."""
    for path in directory.glob(".*.building-*"):
        pid = int(path.name.rsplit("-", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def main() -> None:
    started = time.perf_counter()
    module = native_module()
    portable_module()
    elapsed = time.perf_counter() - started
    # kernels with an AMX and an AVX-512 version
    uses_amx = {"attention_forward": "attention_uses_amx", "attention_backward": "attention_uses_amx",
                "decode_linear": "decode_linear_uses_amx"}
    for name in KERNELS:
        kernel = native_kernel(name)
        state = "available" if kernel is not None else "not available here (PyTorch's ops are used)"
        if kernel is not None and name in uses_amx:
            state += " (AMX)" if getattr(kernel, uses_amx[name])() else " (AVX-512 BF16)"
        print(f"native {name}: {state}")
    print(f"({elapsed:.0f} s{'' if module is not None else ', no native module'})")

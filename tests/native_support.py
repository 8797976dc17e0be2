"""Whether the native kernels can run here: the marker their tests carry."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest


def cpu_has(flag: str) -> bool:
    try:
        return sys.platform.startswith("linux") and flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


needs_native = pytest.mark.skipif(not cpu_has("avx512_bf16") or os.environ.get("THRIFTY_NATIVE") == "0",
                                  reason="the native kernels need Linux and a CPU with AVX-512 BF16 "
                                         "(and are off with THRIFTY_NATIVE=0)")



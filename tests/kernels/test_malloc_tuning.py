"""glibc malloc tuning: applied on Linux, skippable by environment variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from thrifty.kernels.malloc_tuning import tune_malloc

CHECK = "from thrifty.kernels.malloc_tuning import tune_malloc; print(tune_malloc())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_tuning_applies_on_linux() -> None:
    assert tune_malloc() is True


def test_environment_variable_keeps_the_defaults() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], env={"THRIFTY_DEFAULT_MALLOC": "1", "PATH": ""},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


FRAGMENTS = """
import sys
import torch
from thrifty.kernels.malloc_tuning import returning_freed_memory, tune_malloc

def rss() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))

assert tune_malloc()
returning_freed_memory(sys.argv[1] == "return")
big, small = [], []
for _ in range(100):  # 2 MiB blocks, each followed by a small one that stays alive
    big.append(torch.ones(512 * 1024))
    small.append(torch.ones(16 * 1024))
before = rss()
big.clear()
print((before - rss()) / (100 * 2**21))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_returning_freed_memory_hands_fragmented_blocks_back() -> None:
    """200 MiB freed between live small blocks: the tuned heap keeps it for reuse (what
    makes decoding fast), returning_freed_memory gives it back to the system (what a
    checkpointed training step runs with). Not switching the thresholds fails the first."""
    returned = {}
    for mode in ("return", "keep"):
        out = subprocess.run([sys.executable, "-c", FRAGMENTS, mode], capture_output=True, text=True, check=True)
        returned[mode] = float(out.stdout)
    assert returned["return"] > 0.9, returned
    assert returned["keep"] < 0.1, returned

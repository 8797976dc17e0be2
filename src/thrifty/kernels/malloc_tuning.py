"""Keep freed memory in the process instead of handing it back to the OS every time.

glibc's malloc serves every allocation above its mmap threshold (128 KiB to start)
with a fresh mmap and unmaps it on free, and trims the heap top as soon as 128 KiB
are free there. Tensors of a few MiB — a batch of logits, activations, gradients —
are allocated and freed on every decode or training step, so each step page-faults
its memory in again: measured here, sampling one token for 16 rows took 5.2 ms
instead of 1.2 ms. Raising both thresholds makes freed blocks reusable. Peak RSS is
unchanged (it is set by the largest live set); memory is returned at exit.

Set THRIFTY_DEFAULT_MALLOC=1 to keep glibc's defaults.

The other side of that trade: a training step with gradient checkpointing frees and
allocates activations, panels and gradients of many sizes under 32 MiB in the heap, and
the heap fragments. Measured on a 1.5B QLoRA step (2 x 256 tokens): 0.75 GiB of freed
memory kept, more than checkpointing saves. `returning_freed_memory(True)` (what
checkpointed training runs with, between its first forward and its optimizer step)
maps blocks over 1 MiB on their own and trims the heap at 1 MiB: 2.95 -> 2.20 GiB peak,
at 20% of that step's time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024
FRUGAL_THRESHOLD = 1024 * 1024  # both thresholds while returning freed memory

_mallopt = None  # glibc's mallopt once tune_malloc has applied, else None


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds; returns False where that does not apply."""
    if os.environ.get("THRIFTY_DEFAULT_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    global _mallopt
    _mallopt = mallopt
    return _set_thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD)


def returning_freed_memory(enabled: bool) -> None:
    """Hand freed memory back to the system (True) or keep it for reuse (False, the tuned
    default); nothing where tune_malloc did not apply. Blocks already allocated keep
    where they live: switching is safe at any time."""
    if _mallopt is None:
        return
    if enabled:
        _set_thresholds(FRUGAL_THRESHOLD, FRUGAL_THRESHOLD)
    else:
        _set_thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD)


def _set_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    assert _mallopt is not None
    return bool(_mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(_mallopt(M_TRIM_THRESHOLD, trim_threshold))

"""Arguments other libraries take that Thrifty does not: a clear error, or a pass."""

from __future__ import annotations

import sys
from typing import Any

from thrifty.errors import ThriftyError

# Accepted and ignored: they choose devices, kernels or downloads that do not exist here.
HARMLESS = frozenset({
    "device_map", "token", "trust_remote_code", "attn_implementation", "low_cpu_mem_usage", "revision",
    "cache_dir", "local_files_only", "use_cache", "use_fast", "fix_tokenizer", "use_exact_model_name",
    "fast_inference", "gpu_memory_utilization", "disable_log_stats", "resize_model_vocab",
})


def reject_unknown(where: str, kwargs: dict[str, Any], supported: str = "") -> None:
    """Raise for any argument in `kwargs` that is not HARMLESS, naming it."""
    unknown = sorted(k for k in kwargs if k not in HARMLESS)
    if unknown:
        hint = f" Thrifty supports: {supported}." if supported else ""
        raise ThriftyError(f"{where}: {', '.join(repr(k) for k in unknown)} "
                           f"{'is' if len(unknown) == 1 else 'are'} not supported by Thrifty.{hint}")


def notice(text: str) -> None:
    """A one-line notice where Thrifty does something other than the name says elsewhere."""
    print(f"thrifty: {text}", file=sys.stderr, flush=True)

"""Hub ids ("Qwen/Qwen2.5-0.5B-Instruct") resolved offline, from the local Hugging Face cache.

Nothing is downloaded here (there may be no network): a hub id names the snapshot that
`huggingface_hub` left in its cache, looked up as transformers does with
HF_HUB_OFFLINE=1: HF_HUB_CACHE, else HF_HOME/hub, else XDG_CACHE_HOME/huggingface/hub,
else ~/.cache/huggingface/hub; in it models--Org--Name/refs/main names the snapshot
(snapshots/<commit>/). The ids of the built-in default model fall back to the copy
that ships with Thrifty, with a notice (it is the same model, stored as a Q4_1 GGUF).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from thrifty.errors import ThriftyError

# Hub ids of SmolLM2-135M-Instruct, which Thrifty ships (see default_model.py).
DEFAULT_MODEL_HUB_IDS = ("huggingfacetb/smollm2-135m-instruct", "unsloth/smollm2-135m-instruct")
_NOTIFIED: set[str] = set()  # say it once per process
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return cache / "huggingface" / "hub"


def find_in_hub_cache(repo_id: str, revision: str = "main") -> Path | None:
    """The cached snapshot of `repo_id` (a model directory, or its single .gguf file), or None."""
    folder = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = folder / "snapshots" / commit
    if not snapshot.is_dir():
        snapshots = sorted((folder / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime) \
            if (folder / "snapshots").is_dir() else []
        if not snapshots or revision != "main":
            return None
        snapshot = snapshots[-1]  # no refs/main (a partial download tool): the newest snapshot
    if (snapshot / "config.json").is_file():
        return snapshot
    ggufs = sorted(snapshot.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def resolve_hub_id(repo_id: str) -> Path | None:
    """The local path for a hub id; None means "the built-in default model" (with a
    notice); a clear error when it is not cached."""
    found = find_in_hub_cache(repo_id)
    if found is not None:
        return found
    if repo_id.lower() in DEFAULT_MODEL_HUB_IDS:
        if repo_id not in _NOTIFIED:
            _NOTIFIED.add(repo_id)
            print(f"thrifty: {repo_id} is not in the local Hugging Face cache ({hub_cache_dir()}); using the copy "
                  "Thrifty ships (the same model as a Q4_1 GGUF, dequantized).", file=sys.stderr)
        return None
    where = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    raise ThriftyError(f"{repo_id}: no such file or directory, and not in the local Hugging Face cache (looked for "
                       f"{where}). "
                       "Thrifty never downloads: download it where there is a network (`hf download "
                       f"{repo_id}`, into that cache or with --local-dir) and pass the local path, or set "
                       "HF_HUB_CACHE / HF_HOME to the cache that holds it.")

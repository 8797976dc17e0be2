"""Write a whole directory so that it appears complete or not at all.

Files go into a hidden temporary sibling, are flushed to disk, and the directory is
renamed into place. A crash, or kill -9, at any moment leaves either the previous
directory or the new one, plus at worst a `.tmp-*` leftover that
`remove_stale_temporaries` cleans up. Used for checkpoints and exported models.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first.
            # Between the two renames `final` is missing, never half-written; the old copy
            # is named so that remove_stale_temporaries never deletes it.
            old = final.parent / f".old-{final.name}-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(directory: Path) -> None:
    """Delete `.tmp-*` directories a killed process left behind in `directory`."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if path.name.startswith(TMP_PREFIX) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. a platform without directory fds
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

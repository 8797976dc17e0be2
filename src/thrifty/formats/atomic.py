"""Writes that appear complete or not at all, and never hold NaN or infinite weights.

A directory's files go into a hidden temporary sibling, are flushed to disk, and the
directory is renamed into place (`atomic_directory`); a single file is written beside its
destination and renamed over it (`atomic_file`). A crash, or kill -9, at any moment
leaves either the previous version or the new one, plus at worst a `.tmp-*` leftover that
`remove_stale_temporaries` cleans up. A write that fails because the disk is full says
so (torch.save's own error, "unexpected pos", never does). Used for checkpoints,
adapters and exported models.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from thrifty.errors import ThriftyError

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `final`.

    As atomic_file's, the temporary directory is locked while it is filled: a second
    writer of the same `final` is refused, and the temporary directories of killed
    writers (unlocked) are removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # Locked before the others are looked at: of two writers starting together, at
    # least one sees the other's lock (both may, and both stop: never both written).
    lock = os.open(tmp, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        _claim(final, tmp, re.compile(rf"^{re.escape(TMP_PREFIX + final.name)}-\d+$"), "directory")
        with _disk_full_said(final):
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
    finally:
        os.close(lock)


def atomic_file(path: Path, write: Callable[[str], None]) -> None:
    """write(temp_path) then rename over `path`: readers never see a half-written file.

    The temporary file is locked while it is written, so a second writer of the same
    path is refused (not silently replaced by the first, or replacing it) and the
    temporary files of killed writers, unlocked, are removed."""
    path = Path(path)
    if path.is_dir():
        raise ThriftyError(f"{path} is a directory; give the path of the file to write.")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise ThriftyError(f"{path}: cannot write in {path.parent} ({error.strerror}). Choose a directory you can "
                           "write to, or change its permissions.") from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours alone: the file is new
        _claim(path, Path(tmp), re.compile(rf"^\.{re.escape(path.name)}\.[A-Za-z0-9_]+\.tmp$"), "file")  # mkstemp's
        with _disk_full_said(path):
            write(tmp)
        # mkstemp makes the file owner-only; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        os.close(fd)


def _claim(destination: Path, own: Path, temporaries: re.Pattern[str], what: str) -> None:
    """Refuse when another process is writing `destination` now (its temporary file or
    directory, named by `temporaries`, is locked); remove those killed writers left
    (unlocked)."""
    for other in destination.parent.iterdir():
        if other == own or not temporaries.match(other.name):
            continue
        try:
            fd = os.open(other, os.O_RDONLY)
        except FileNotFoundError:  # finished or removed meanwhile
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ThriftyError(f"{destination}: another process is writing this {what} now. Wait for it to "
                                   "finish, or write to another path.") from None
            if other.is_dir():
                shutil.rmtree(other, ignore_errors=True)
            else:
                os.remove(other)
        finally:
            os.close(fd)


def require_finite(tensors: Mapping[str, torch.Tensor], destination: Path | str) -> None:
    """Refuse to write weights holding NaN or infinity: a file that loads and then
    answers garbage is worse than no file."""
    bad = non_finite(tensors)
    if bad:
        raise ThriftyError(f"{destination}: not written, {len(bad)} of {len(tensors)} tensors hold NaN or infinite "
                           f"values (e.g. {', '.join(bad[:3])}). The training that made them diverged: train again "
                           "with a lower learning_rate, or use an earlier checkpoint.")


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold NaN or infinity."""
    return [name for name, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


class DiskFull(ThriftyError):
    """A write failed for lack of space."""


@contextlib.contextmanager
def _disk_full_said(destination: Path) -> Iterator[None]:
    """Turn the errors a full disk causes (ENOSPC, torch.save's "unexpected pos",
    safetensors' "os error 28") into one that says so, naming `destination`."""
    try:
        yield
    except Exception as error:
        free = shutil.disk_usage(destination.parent if destination.parent.exists() else ".").free
        full = isinstance(error, DiskFull) or getattr(error, "errno", None) == errno.ENOSPC or free < 16 * 2**20
        if not full or (isinstance(error, ThriftyError) and not isinstance(error, DiskFull)):
            raise
        raise DiskFull(f"{destination}: not written, the disk is full ({free / 2**20:.0f} MB free on "
                       f"{destination.parent}). Free some space (older checkpoints, exports) or write elsewhere; "
                       "what was written before is intact.") from error


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

"""atomic_file between processes: a second writer of a path that is being written is
refused (the first would otherwise silently replace it, or be replaced), and the
temporary file a killed writer left is removed by the next write. Real processes,
real kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thrifty.errors import ThriftyError
from thrifty.formats.atomic import atomic_file

# A writer that writes half its bytes, says so, and waits for the test to let it finish.
SLOW_WRITER = """
import sys, time
from pathlib import Path
from thrifty.formats.atomic import atomic_file

target, started, release = map(Path, sys.argv[1:])

def write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"first half ")
        f.flush()
        started.touch()
        for _ in range(600):
            if release.exists():
                break
            time.sleep(0.1)
        f.write(b"and the rest")

atomic_file(target, write)
"""


def start_writer(tmp_path: Path, script: str = SLOW_WRITER,
                 name: str = "model.gguf") -> tuple[subprocess.Popen, Path, Path]:
    target, started, release = tmp_path / name, tmp_path / "started", tmp_path / "release"
    writer = subprocess.Popen([sys.executable, "-c", script, str(target), str(started), str(release)])
    deadline = time.monotonic() + 60
    while not started.exists():
        assert writer.poll() is None, "the writer died before writing"
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.05)
    return writer, target, release


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_a_second_writer_of_the_same_path_is_refused(tmp_path: Path) -> None:
    writer, target, release = start_writer(tmp_path)
    try:
        with pytest.raises(ThriftyError, match=r"model\.gguf: another process is writing this file now"):
            atomic_file(target, lambda tmp: Path(tmp).write_bytes(b"second"))
        assert not target.exists()  # the refused writer wrote nothing in place
    finally:
        release.touch()
        writer.wait(timeout=60)
    assert writer.returncode == 0
    assert target.read_bytes() == b"first half and the rest"  # the first writer's file, whole
    assert temporaries(tmp_path) == []


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path: Path) -> None:
    writer, target, _ = start_writer(tmp_path)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=60)
    assert len(temporaries(tmp_path)) == 1  # kill -9 leaves the half-written temporary file
    other = tmp_path / "other.gguf"
    atomic_file(other, lambda tmp: Path(tmp).write_bytes(b"unrelated"))
    assert len(temporaries(tmp_path)) == 1  # another path's write leaves it alone
    atomic_file(target, lambda tmp: Path(tmp).write_bytes(b"complete"))
    assert target.read_bytes() == b"complete" and temporaries(tmp_path) == []


def test_a_directory_that_cannot_take_the_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ThriftyError, match=r"model\.gguf: cannot write in .*missing \(No such file or directory\)"):
        atomic_file(tmp_path / "missing" / "model.gguf", lambda tmp: None)
    (tmp_path / "model.gguf").mkdir()
    with pytest.raises(ThriftyError, match="is a directory"):
        atomic_file(tmp_path / "model.gguf", lambda tmp: None)


# The same for atomic_directory (merged models, adapters, checkpoints): a writer that fills
# half its directory, says so, and waits.
SLOW_DIRECTORY_WRITER = """
import sys, time
from pathlib import Path
from thrifty.formats.atomic import atomic_directory

target, started, release = map(Path, sys.argv[1:])
with atomic_directory(target) as tmp:
    (tmp / "first.bin").write_bytes(b"first")
    started.touch()
    for _ in range(600):
        if release.exists():
            break
        time.sleep(0.1)
    (tmp / "second.bin").write_bytes(b"second")
"""


def start_directory_writer(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    return start_writer(tmp_path, SLOW_DIRECTORY_WRITER, "merged")


def hidden_directories(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and p.name.startswith("."))


def test_a_second_writer_of_the_same_directory_is_refused(tmp_path: Path) -> None:
    from thrifty.formats.atomic import atomic_directory

    writer, target, release = start_directory_writer(tmp_path)
    try:
        with pytest.raises(ThriftyError, match=r"merged: another process is writing this directory now"):
            with atomic_directory(target) as tmp:
                (tmp / "mine.bin").write_bytes(b"second writer")
        assert not target.exists()
    finally:
        release.touch()
        writer.wait(timeout=60)
    assert writer.returncode == 0
    assert sorted(p.name for p in target.iterdir()) == ["first.bin", "second.bin"]  # the first writer's, whole
    assert hidden_directories(tmp_path) == []


def test_a_killed_directory_writers_leftover_is_removed_by_the_next_write(tmp_path: Path) -> None:
    from thrifty.formats.atomic import atomic_directory

    writer, target, _ = start_directory_writer(tmp_path)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=60)
    assert len(hidden_directories(tmp_path)) == 1  # kill -9 leaves the half-filled directory
    with atomic_directory(tmp_path / "other") as tmp:
        (tmp / "x.bin").write_bytes(b"unrelated")
    assert len(hidden_directories(tmp_path)) == 1  # another destination's write leaves it alone
    with atomic_directory(target) as tmp:
        (tmp / "complete.bin").write_bytes(b"complete")
    assert hidden_directories(tmp_path) == [] and [p.name for p in target.iterdir()] == ["complete.bin"]

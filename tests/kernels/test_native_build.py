"""Building the native module: a compile killed halfway (kill -9 or Ctrl-C) never blocks
the next one. A small real extension is compiled by real processes, one of them killed
while its compiler runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROBE = """#include <torch/extension.h>
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""
BUILD = ("import sys; from pathlib import Path; from thrifty.kernels.native import build_module; "
         "print(build_module('thrifty_probe', Path(sys.argv[1])).answer())")


def building_dirs(builds: Path) -> list[Path]:
    return list(builds.rglob(".*.building-*"))


@pytest.mark.parametrize("interrupt", [signal.SIGKILL, signal.SIGINT])
def test_an_interrupted_compile_never_blocks_the_next(tmp_path: Path, interrupt: signal.Signals) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "probe.cpp").write_text(PROBE)
    builds = tmp_path / "builds"
    env = {**os.environ, "THRIFTY_NATIVE_BUILD_DIR": str(builds)}
    # Ctrl-C as a terminal delivers it: a shell's background job inherits SIGINT ignored,
    # and Python then never raises KeyboardInterrupt (the build would just finish).
    first = subprocess.Popen([sys.executable, "-c", BUILD, str(source)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    # Interrupt while the compiler runs: PyTorch's loader holds its lock file then.
    while not any((d / "lock").exists() for d in building_dirs(builds)):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    time.sleep(1.0)
    first.send_signal(interrupt)
    first.wait(timeout=60)
    assert first.returncode != 0
    if interrupt == signal.SIGKILL:  # nothing could clean up: the half-built directory stays
        assert building_dirs(builds)
    else:
        assert not building_dirs(builds)  # Ctrl-C: the process removed its own

    second = subprocess.run([sys.executable, "-c", BUILD, str(source)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.strip() == "42"
    assert "Compiling Thrifty's native kernels" in second.stderr  # says what it is doing
    assert not building_dirs(builds)  # the abandoned build is gone
    (built,) = [d for d in builds.rglob("thrifty_probe-*") if d.is_dir()]
    assert (built / "thrifty_probe.so").is_file()

    third = subprocess.run([sys.executable, "-c", BUILD, str(source)], env=env, capture_output=True, text=True,
                           timeout=120)
    assert third.stdout.strip() == "42" and "Compiling" not in third.stderr  # loaded, not built again

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

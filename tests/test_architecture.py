"""The package's shape: its layers import only downward, nothing imports in a circle
(function-local imports included), the command line answers without torch, and no
module grows past a size one can read in a sitting."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "thrifty"

# Lower layers first; a module may import its own layer and the layers before it. Layers
# of one rank are siblings and do not import each other. errors and config_io are
# torch-free helpers every layer may use.
LAYERS = {"errors": -2, "config_io": -1, "kernels": 0, "layers": 1, "model": 2, "formats": 3,
          "generation": 4, "training": 4, "sft": 5, "grpo": 5, "compat": 6, "recipes": 6, "cli": 7, "__main__": 8}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The thrifty modules `path` imports anywhere in it (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("thrifty."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("thrifty") and node.level == 0:
            for alias in node.names:  # `from thrifty.kernels import native` names a module
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists()
                found.add(candidate if is_module else node.module)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    # `from thrifty import __version__` reads the torch-free face, which sits below every layer
    return {name: {m for m in imports_of(path) if m in modules and m not in (name, "thrifty")}
            for name, path in modules.items() if name != "thrifty"}  # the lazy face imports nothing eagerly


def layer_of(module: str) -> str:
    return module.split(".")[1]


def test_layers_import_only_downward() -> None:
    upward = []
    for module, imported in graph().items():
        for other in imported:
            mine, theirs = LAYERS[layer_of(module)], LAYERS[layer_of(other)]
            if theirs > mine or (theirs == mine and layer_of(module) != layer_of(other)):
                upward.append(f"{module} -> {other}")
    assert not upward, upward


def test_no_import_cycles() -> None:
    edges = graph()
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, cycles


def test_the_graph_sees_the_imports() -> None:
    # The walk above must find real edges, or the two tests above pass on nothing.
    edges = graph()
    assert "thrifty.kernels.native" in edges["thrifty.kernels.attention"]
    assert "thrifty.formats.gguf_reader" in edges["thrifty.formats.gguf_tokenizer"]
    assert "thrifty.grpo.trainer" in edges["thrifty.cli"]  # a function-local import


def test_cli_answers_without_torch() -> None:
    code = ("import sys, runpy; sys.argv = ['thrifty', '--help']\n"
            "try:\n    runpy.run_module('thrifty', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "import thrifty.sft.config, thrifty.grpo.config\n"
            "thrifty.sft.config.load_sft_config(None, ['learning_rate=1e-4'])\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "sft" in result.stdout and result.stdout.strip().endswith("False")


def test_public_names_load_from_the_package() -> None:
    import thrifty

    for name in thrifty.__all__:
        assert getattr(thrifty, name) is not None
    assert "SFTTrainer" in dir(thrifty)


def test_no_module_over_600_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long

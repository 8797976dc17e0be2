"""Dataclass configs from YAML files plus `key=value` command-line overrides.

Every trainer config (SFTConfig, GRPOConfig) is a flat dataclass; this module turns a
YAML file and a list of overrides into one, checking each value against the field's
type hint, so that a typo or a wrong type fails before any model is loaded, with a
message naming the file, line and key and saying what would be accepted:

    config = load_config(SFTConfig, "examples/sft_default.yaml", ["learning_rate=1e-4"])

Types understood: bool, int, float, str, Literal[...], list[X], dict, and unions of
these with None (`str | None`, `str | bool`, `list[str] | str`). Numbers written as
strings are accepted where a number is expected: PyYAML reads `2e-4` (no dot) as a
string, and that is how learning rates are usually written.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

from thrifty.errors import ThriftyError

C = TypeVar("C")

_NULL_WORDS = ("null", "none", "~", "")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Build `cls` from a YAML mapping of field: value (optional) and `key=value` overrides.

    Overrides win over the file. Errors from the dataclass's own checks (__post_init__)
    are re-raised with the config file named, so the user knows where to look.
    """
    values: dict[str, Any] = {} if path is None else read_yaml_values(cls, Path(path))
    for item in overrides:
        key, value = parse_override(cls, item)
        values[key] = value
    source = str(path) if path is not None else "config"
    if overrides:
        source += f" (with overrides {' '.join(overrides)})"
    try:
        return cls(**values)
    except ThriftyError as e:
        raise ThriftyError(f"{source}: {e}") from e


def refuse_unknown_fields(cls: type[C]) -> type[C]:
    """Class decorator, after @dataclass: a keyword argument that is not a field raises a
    ThriftyError naming it (and the closest field) instead of a TypeError, so code written
    for TRL learns which of its settings Thrifty lacks."""
    generated = cls.__init__
    names = {f.name: f.type for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @functools.wraps(generated)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            raise ThriftyError(f"{cls.__name__}: {unknown[0]!r} is not a setting Thrifty has"
                               f"{_suggestion(unknown[0], names)}; remove it (every field: "
                               f"thrifty.{cls.__name__}.__dataclass_fields__).")
        generated(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def require(config: Any, ok: bool, name: str, what: str) -> None:
    """A value check for a config's __post_init__: when `ok` is false, stop naming the
    field, its value and what it must be (load_config adds the file)."""
    if not ok:
        raise ThriftyError(f"{name} = {getattr(config, name)!r}: {what}.")


def resolve_next_to(config: Any, path: str | Path | None, names: Sequence[str]) -> None:
    """A relative file path (of the fields `names`) that does not exist from the working
    directory is looked up next to the YAML file at `path`: `thrifty sft examples/x.yaml`
    works from anywhere, while paths relative to where you run keep working too."""
    if path is None:
        return
    here = Path(path).parent
    for name in names:
        value = getattr(config, name)
        if value and not Path(value).is_absolute() and not Path(value).exists() and (here / value).exists():
            setattr(config, name, str(here / value))


def read_yaml_values(cls: type[Any], path: Path) -> dict[str, Any]:
    """The file's top-level mapping, each value checked and converted to its field's type.
    The file may be a pipe (`<(...)`), or "-" for standard input."""
    if str(path) != "-" and not path.exists():
        raise ThriftyError(f"{path}: config file not found.")
    if path.is_dir():
        raise ThriftyError(f"{path}: is a directory; pass a YAML config file.")
    try:
        text = sys.stdin.buffer.read().decode("utf-8") if str(path) == "-" else path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise ThriftyError(f"{path}: not UTF-8 text (bad byte at offset {e.start}).") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path} line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and context_mark is not None:
            problem += f", {context} that starts on line {context_mark.line + 1}"
        raise ThriftyError(f"{where}: malformed YAML ({problem}).") from e
    if data is None:
        return {}  # an empty file: all defaults
    if not isinstance(data, dict):
        raise ThriftyError(f"{path}: expected a mapping of `key: value` lines at the top level, "
                           f"got {_describe(data)}.")
    lines = _key_lines(node)
    _refuse_repeated_keys(node, path)
    hints = field_types(cls)
    values: dict[str, Any] = {}
    for key, raw in data.items():
        where = f"{path} line {lines[key]}" if key in lines else str(path)
        if not isinstance(key, str) or key not in hints:
            raise ThriftyError(f"{where}: unknown key {key!r}{_suggestion(str(key), hints)}. "
                               f"Valid keys for {cls.__name__}: {', '.join(hints)}.")
        values[key] = coerce(raw, hints[key], f"{where}: {key}")
    return values


def parse_override(cls: type[Any], item: str) -> tuple[str, Any]:
    """`key=value` from the command line -> (key, value converted to the field's type)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    hints = field_types(cls)
    if not sep or not key:
        raise ThriftyError(f"command-line override {item!r} is not of the form key=value "
                           f"(e.g. learning_rate=1e-4).")
    if key not in hints:
        raise ThriftyError(f"command-line override {item!r}: unknown key {key!r}{_suggestion(key, hints)}. "
                           f"Valid keys for {cls.__name__}: {', '.join(hints)}.")
    return key, coerce_string(text, hints[key], f"command-line override {key}")


def field_types(cls: type[Any]) -> dict[str, Any]:
    """Field name -> resolved type hint, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain YAML/JSON-friendly values (for saving with checkpoints)."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------- conversion


def coerce_string(text: str, hint: Any, where: str) -> Any:
    """A command-line string -> the field's type. Plain `str` fields take the text as is
    (so output_dir=0123 stays "0123"); other fields read it as a YAML scalar or flow
    list first, so `true`, `null`, `3` and `[q_proj, v_proj]` mean what they say."""
    if hint is str:
        return text
    options = _union_options(hint)
    if str in options or _is_literal_of_strings(hint):
        stripped = text.strip()
        if type(None) in options and stripped.lower() in _NULL_WORDS:
            return None
        if stripped.lower() in _TRUE_WORDS + _FALSE_WORDS and bool in options:
            return coerce(stripped, bool, where)
        if stripped.startswith("[") and any(_origin(o) is list for o in options):
            return coerce(_yaml_scalar(stripped), hint, where)
        return coerce(text, hint, where)
    return coerce(_yaml_scalar(text), hint, where)


def _yaml_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` (from YAML) as type `hint`, or a ThriftyError saying what was expected."""
    options = _union_options(hint)
    if len(options) > 1:
        if value is None and type(None) in options:
            return None
        # Prefer an exact type match (a YAML `true` for `str | bool` is the bool), then
        # try each alternative in declaration order.
        for option in options:
            if option is not type(None) and _matches_exactly(value, option):
                return coerce(value, option, where)
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except ThriftyError:
                continue
        raise ThriftyError(f"{where}: expected {_type_name(hint)}, got {_describe(value)}.")
    return _coerce_single(value, hint, where)


def _coerce_single(value: Any, hint: Any, where: str) -> Any:
    origin = _origin(hint)
    if hint is Any:
        return value
    if hint is type(None):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULL_WORDS):
            return None
        raise ThriftyError(f"{where}: expected null, got {_describe(value)}.")
    if origin is Literal:
        choices = typing.get_args(hint)
        for choice in choices:
            if value == choice and type(value) is type(choice):
                return choice
        if isinstance(value, str):
            for choice in choices:
                if isinstance(choice, str) and choice.lower() == value.strip().lower():
                    return choice
        shown = ", ".join(repr(c) for c in choices)
        raise ThriftyError(f"{where}: must be one of {shown}, got {_describe(value)}.")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ThriftyError(f"{where}: expected true or false, got {_describe(value)}.")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                try:
                    number = float(value)
                except ValueError:
                    number = None
                if number is not None and number.is_integer():
                    return int(number)
        raise ThriftyError(f"{where}: expected a whole number (e.g. 8), got {_describe(value)}.")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ThriftyError(f"{where}: expected a number (e.g. 2e-4 or 0.1), got {_describe(value)}.")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `run_name: 2024` in YAML
        raise ThriftyError(f"{where}: expected a string, got {_describe(value)}.")
    if origin is list:
        (item_type,) = typing.get_args(hint) or (Any,)
        if isinstance(value, (list, tuple)):
            return [coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        raise ThriftyError(f"{where}: expected a list of {_type_name(item_type)} (YAML: [a, b]), "
                           f"got {_describe(value)}.")
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ThriftyError(f"{where}: expected a mapping (YAML: {{key: value}}), got {_describe(value)}.")
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ThriftyError(f"{where}: expected {_type_name(hint)}, got {_describe(value)}.")


def _origin(hint: Any) -> Any:
    return typing.get_origin(hint)


def _union_options(hint: Any) -> tuple[Any, ...]:
    if _origin(hint) in (Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _is_literal_of_strings(hint: Any) -> bool:
    return any(_origin(o) is Literal and any(isinstance(c, str) for c in typing.get_args(o))
               for o in _union_options(hint))


def _matches_exactly(value: Any, hint: Any) -> bool:
    origin = _origin(hint)
    if origin is Literal:
        return any(value == c and type(value) is type(c) for c in typing.get_args(hint))
    if origin is list:
        return isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return type(value) is hint
    return False


def _type_name(hint: Any) -> str:
    options = _union_options(hint)
    if len(options) > 1:
        return " or ".join(_type_name(o) for o in options)
    origin = _origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    if origin is list:
        args = typing.get_args(hint)
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
             type(None): "null", dict: "a mapping"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "the string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{kind} {shown}"


def _suggestion(key: str, hints: dict[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(hints), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _key_lines(node: yaml.Node | None) -> dict[Any, int]:
    """1-based line of each top-level key, for error messages."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key_node.value: key_node.start_mark.line + 1 for key_node, _ in node.value
            if isinstance(key_node, yaml.ScalarNode)}


def _refuse_repeated_keys(node: yaml.Node | None, path: Path) -> None:
    """YAML lets a later `key:` silently replace an earlier one; in a config that hides
    which value a run used."""
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        line = key_node.start_mark.line + 1
        if key_node.value in first:
            raise ThriftyError(f"{path} line {line}: key {key_node.value!r} is set again (first on line "
                               f"{first[key_node.value]}); keep one of them.")
        first[key_node.value] = line


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value

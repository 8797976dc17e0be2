"""Built-in verifiable tasks for GRPO: seeded offline data plus exact checkers and rewards.

    task = get_task("arithmetic", operand_digits=(2, 2))
    train, held_out = task.rows("train", 2000, seed=0), task.rows("eval", 200, seed=0)
    GRPOTrainer(..., reward_funcs=task.reward_funcs(), train_dataset=train, ...)

Rows hold `prompt` (chat messages: a system prompt stating the answer format, then the
question) and `answer`, plus task-specific columns (countdown: `numbers`, `target`) that
reach reward functions as keyword arguments, as in TRL.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from collections.abc import Callable
from typing import Any

from thrifty.errors import ThriftyError
from thrifty.grpo.tasks.arithmetic import ArithmeticTask
from thrifty.grpo.tasks.common import Row, Split, Task
from thrifty.grpo.tasks.countdown import CountdownTask
from thrifty.grpo.tasks.gsm import GSMTask

_BUILTIN: dict[str, Callable[..., Task]] = {
    "arithmetic": ArithmeticTask,
    "countdown": CountdownTask,
    "gsm": GSMTask,
}
_REASONING_GYM_PREFIX = "reasoning_gym:"


def available_tasks() -> list[str]:
    """Names get_task accepts; 'reasoning_gym:<dataset>' is listed when reasoning-gym is installed."""
    names = sorted(_BUILTIN)
    if importlib.util.find_spec("reasoning_gym") is not None:
        names.append(_REASONING_GYM_PREFIX + "<dataset>")
    return names


def get_task(name: str, **kwargs: Any) -> Task:
    """The task called `name`, built with its settings (e.g. get_task("countdown", num_numbers=3))."""
    if name.startswith(_REASONING_GYM_PREFIX):
        from thrifty.grpo.tasks.reasoning_gym_task import ReasoningGymTask

        return ReasoningGymTask(name[len(_REASONING_GYM_PREFIX):], **kwargs)
    check_task_settings(name, kwargs)
    return _BUILTIN[name](**kwargs)


def check_task_settings(name: str, settings: dict[str, Any]) -> None:
    """Refuse an unknown built-in task, a setting it does not have or a value of the wrong
    type, naming the setting and what it takes: before any work, not deep in a reward.
    (reasoning_gym datasets check their own settings when built.)"""
    if name.startswith(_REASONING_GYM_PREFIX):
        return
    factory = _BUILTIN.get(name)
    if factory is None:
        raise ThriftyError(f"unknown task {name!r}; available: {', '.join(available_tasks())} "
                           "(or reasoning_gym:<dataset> with reasoning-gym installed).")
    hints = typing.get_type_hints(factory)
    fields = {f.name for f in dataclasses.fields(factory)}  # type: ignore[arg-type]
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ThriftyError(f"task {name!r} has no setting {', '.join(unknown)}; its settings: "
                           f"{', '.join(sorted(fields))}.")
    for key, value in settings.items():
        if not _has_type(value, hints[key]):
            raise ThriftyError(f"task {name!r}: setting {key} takes {_described(hints[key])}, not {value!r}.")


def _has_type(value: Any, hint: Any) -> bool:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_has_type(value, option) for option in args)
    if typing.get_origin(hint) is tuple:  # YAML gives lists: either is fine
        return isinstance(value, (list, tuple)) and all(_has_type(item, args[0]) for item in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return value is None if hint is type(None) else isinstance(value, hint)


def _described(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_described(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a list of {_described(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a text",
            type(None): "null"}.get(hint, str(hint))


__all__ = ["ArithmeticTask", "CountdownTask", "GSMTask", "Row", "Split", "Task", "available_tasks",
           "check_task_settings", "get_task"]

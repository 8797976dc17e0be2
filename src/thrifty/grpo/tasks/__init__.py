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
    factory = _BUILTIN.get(name)
    if factory is None:
        raise ThriftyError(f"unknown task {name!r}; available: {', '.join(available_tasks())} "
                           "(or reasoning_gym:<dataset> with reasoning-gym installed).")
    fields = {f.name for f in dataclasses.fields(factory)}  # type: ignore[arg-type]
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ThriftyError(f"task {name!r} has no setting {', '.join(unknown)}; its settings: {', '.join(sorted(fields))}.")
    return factory(**kwargs)


__all__ = ["ArithmeticTask", "CountdownTask", "GSMTask", "Row", "Split", "Task", "available_tasks", "get_task"]

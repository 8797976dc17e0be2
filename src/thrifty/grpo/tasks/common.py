"""What every built-in task shares: disjoint seeded splits, chat prompts, safe arithmetic,
and the reward function that wraps a task's exact checker.

Splits: each problem has a canonical key (e.g. "37+48"), and a hash of the key decides
once and for all whether it is an eval problem. So train and eval never overlap, whatever
the seeds and sizes, and a bigger request extends a smaller one (rows are prefix-stable).
"""

from __future__ import annotations

import ast
import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal, Protocol

from thrifty.errors import ThriftyError
from thrifty.grpo.rewards import RewardFunc, completion_text, extract_answer, parse_number

Row = dict[str, Any]
Split = Literal["train", "eval"]
SPLITS: tuple[str, ...] = ("train", "eval")

# Draws in a row that may find nothing new before a split is declared exhausted.
_MAX_FRUITLESS_DRAWS = 20_000


class Task(Protocol):
    """What a task offers; the built-in ones are frozen dataclasses holding their settings."""

    name: str

    def rows(self, split: Split, n: int, seed: int = 0) -> list[Row]:
        """n distinct problems of the split, each with `prompt` (chat messages) and `answer`."""
        ...

    def check(self, completion: Any, row: Mapping[str, Any]) -> bool:
        """Exactly verify one completion (string or assistant messages) against its row."""
        ...

    def reward_funcs(self) -> list[RewardFunc]: ...

    def reward_weights(self) -> list[float]: ...


def chat_prompt(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def split_of(key: str, eval_fraction: float) -> Split:
    """Which split a problem belongs to, from a hash of its key: stable across runs and machines."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "eval" if h < eval_fraction else "train"


def sample_rows(task: str, split: str, n: int, seed: int, eval_fraction: float,
                make: Callable[[random.Random], tuple[str, Row]]) -> list[Row]:
    """Draw problems with `make(rng) -> (key, row)` until n distinct ones of `split` are found.

    The RNG is seeded from (task, seed, split), so the splits use different streams too.
    """
    if split not in SPLITS:
        raise ThriftyError(f"{task}: split must be 'train' or 'eval'; got {split!r}.")
    if n < 0:
        raise ThriftyError(f"{task}: the number of rows must be >= 0; got {n}.")
    if not 0.0 < eval_fraction < 1.0:
        raise ThriftyError(f"{task}: eval_fraction must be between 0 and 1; got {eval_fraction}.")
    rng = random.Random(f"{task}:{seed}:{split}")
    rows: list[Row] = []
    seen: set[str] = set()
    fruitless = 0
    while len(rows) < n:
        key, row = make(rng)
        if key in seen or split_of(key, eval_fraction) != split:
            fruitless += 1
            if fruitless > _MAX_FRUITLESS_DRAWS:
                raise ThriftyError(
                    f"{task}: found only {len(rows)} distinct {split} problems of the {n} asked for; these "
                    "settings allow too few problems. Ask for fewer rows or make the task bigger "
                    "(more digits or numbers)."
                )
            continue
        fruitless = 0
        seen.add(key)
        rows.append(row)
    return rows


def answer_region(completion: Any) -> str:
    """Where a completion's answer is: inside its last <answer> tag, else the whole text."""
    text = completion_text(completion)
    tagged = extract_answer(text)
    return text if tagged is None else tagged


def numeric_check(completion: Any, row: Mapping[str, Any]) -> bool:
    """The final number of the answer region equals the row's integer answer exactly."""
    got = parse_number(answer_region(completion))
    return got is not None and got == Fraction(int(row["answer"]))


# ---------------------------------------------------------------------------- safe arithmetic

_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_MAX_EXPRESSION_CHARS = 200


@dataclass(frozen=True)
class Evaluated:
    value: Fraction
    numbers: tuple[int, ...]  # the integer literals used, in order


def safe_eval(expression: str) -> Evaluated | None:
    """Value of an expression of non-negative integers, + - * / and parentheses; None if it is
    anything else (names, calls, powers, unary minus, floats) or divides by zero.

    Parsed with `ast` and walked by hand with exact Fractions: nothing is ever executed,
    and no input can build huge numbers (no powers) or run long (length capped).
    """
    expression = expression.replace("×", "*").replace("÷", "/").replace("−", "-").strip()
    if not expression or len(expression) > _MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    numbers: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if right == 0:
                raise ZeroDivisionError
            return left / right
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
            numbers.append(node.value)
            return Fraction(node.value)
        raise ValueError(f"not allowed: {type(node).__name__}")

    try:
        value = walk(tree.body)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None
    return Evaluated(value, tuple(numbers))


def tidy_expression(expression: str) -> str:
    """The same expression with only the parentheses it needs, e.g. "((3 + 4) * 5)" -> "(3 + 4) * 5"."""
    return ast.unparse(ast.parse(expression, mode="eval"))


# ---------------------------------------------------------------------------- rewards


@dataclass(frozen=True)
class CheckerReward:
    """1.0 when a task's exact checker accepts the completion, else 0.0 (a TRL-style reward
    function); a checker that returns a number in [0, 1] gives that number (partial credit).

    Each completion's row is rebuilt from its prompt and the dataset columns passed as keyword
    arguments, so the checker sees exactly the `prompt`/`answer`/`numbers`/`target` of its own row.
    """

    check: Callable[[Any, Mapping[str, Any]], bool | float]
    name: str

    @property
    def __name__(self) -> str:  # type: ignore[override]
        return self.name

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                 **columns: Any) -> list[float | None]:
        n = len(completions)
        per_row = {k: v for k, v in columns.items()
                   if isinstance(v, Sequence) and not isinstance(v, (str, bytes)) and len(v) == n}
        if "answer" not in per_row:
            raise ThriftyError(f"{self.name} needs the dataset's `answer` column (one per completion); "
                               f"got columns: {sorted(columns) or 'none'}.")
        if prompts is not None and len(prompts) == n:
            per_row["prompt"] = prompts
        return [float(self.check(c, {k: v[i] for k, v in per_row.items()})) for i, c in enumerate(completions)]

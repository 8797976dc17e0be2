"""Countdown: reach a target number from given numbers with + - * /, each number at most once.

Every problem is generated from a witness: the numbers are combined at random, pairwise,
with operations that keep every intermediate a positive integer, and the final value is
the target. So every problem is solvable (the witness is the row's `answer`), though a
completion may find any other correct expression. Completions are verified by parsing,
never by eval(): see common.safe_eval.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from thrifty.errors import ThriftyError
from thrifty.grpo.rewards import RewardFunc, completion_text, extract_answer, format_reward
from thrifty.grpo.tasks.common import CheckerReward, Row, Split, chat_prompt, safe_eval, sample_rows, tidy_expression

SYSTEM_PROMPT = (
    "Think step by step inside <think></think>, then write one expression that reaches the target "
    "inside <answer></answer>, for example <answer>(1 + 2) * 3</answer>."
)


@dataclass(frozen=True)
class CountdownTask:
    """num_numbers numbers drawn from [min_number, max_number] (repeats allowed, as on the TV
    show); targets in [min_target, max_target]. use_all: the checker also requires every
    number to be used (TinyZero's rule); otherwise each at most once."""

    name: ClassVar[str] = "countdown"
    num_numbers: int = 4
    min_number: int = 1
    max_number: int = 50
    min_target: int = 10
    max_target: int = 100
    use_all: bool = False
    eval_fraction: float = 0.1
    system_prompt: str = SYSTEM_PROMPT
    format_weight: float = 0.1

    def __post_init__(self) -> None:
        if not 2 <= self.num_numbers <= 8:
            raise ThriftyError(f"countdown: num_numbers must be between 2 and 8; got {self.num_numbers}.")
        if not 1 <= self.min_number <= self.max_number:
            raise ThriftyError(f"countdown: need 1 <= min_number <= max_number; got {self.min_number}, {self.max_number}.")
        if not 1 <= self.min_target <= self.max_target:
            raise ThriftyError(f"countdown: need 1 <= min_target <= max_target; got {self.min_target}, {self.max_target}.")

    def rows(self, split: Split, n: int, seed: int = 0) -> list[Row]:
        return sample_rows(self.name, split, n, seed, self.eval_fraction, self._make)

    def check(self, completion: Any, row: Mapping[str, Any]) -> bool:
        return check_expression(completion_expression(completion), list(row["numbers"]), int(row["target"]), self.use_all)

    def reward_funcs(self) -> list[RewardFunc]:
        return [CheckerReward(self.check, "countdown_correct"), format_reward]

    def reward_weights(self) -> list[float]:
        return [1.0, self.format_weight]

    def _make(self, rng: random.Random) -> tuple[str, Row]:
        while True:
            numbers = [rng.randint(self.min_number, self.max_number) for _ in range(self.num_numbers)]
            witness = _random_witness(rng, numbers)
            if witness is None:
                continue
            value, expression = witness
            if not self.min_target <= value <= self.max_target:
                continue
            key = f"{sorted(numbers)}->{value}"
            user = (f"Using the numbers {numbers}, create an equation that equals {value}. "
                    f"You can use + - * / and each number at most once.")
            row = {"prompt": chat_prompt(self.system_prompt, user), "answer": tidy_expression(expression),
                   "numbers": numbers, "target": value}
            return key, row


def _random_witness(rng: random.Random, numbers: list[int]) -> tuple[int, str] | None:
    """Combine all numbers pairwise at random into one positive integer; (value, expression)."""
    pool = [(n, str(n)) for n in numbers]
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        (a, ea), (b, eb) = pool[i], pool[j]
        choices = [("+", a + b), ("*", a * b)]
        if a > b:
            choices.append(("-", a - b))
        if b > 1 and a % b == 0:
            choices.append(("/", a // b))
        op, value = rng.choice(choices)
        pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [(value, f"({ea} {op} {eb})")]
    value, expression = pool[0]
    return (value, expression) if value > 0 else None


def completion_expression(completion: Any) -> str:
    """The expression a completion proposes: its last <answer> content, else its last non-empty line."""
    text = completion_text(completion)
    tagged = extract_answer(text)
    if tagged is not None:
        return tagged
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def check_expression(expression: str, numbers: list[int], target: int, use_all: bool = False) -> bool:
    """True iff the expression uses only the given numbers (each at most as often as given;
    all of them if use_all), + - * / and parentheses, and equals target exactly.
    "expr = target" is accepted; a right-hand side other than the target is not."""
    lhs, _, rhs = expression.partition("=")
    if rhs.strip():
        rhs_value = safe_eval(rhs)
        if rhs_value is None or rhs_value.numbers != (target,) or rhs_value.value != target:
            return False
    result = safe_eval(lhs)
    if result is None or result.value != target:
        return False
    used, given = Counter(result.numbers), Counter(numbers)
    if use_all:
        return used == given
    return all(used[n] <= given[n] for n in used)

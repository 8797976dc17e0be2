"""GSM-style word problems: a few templated multi-step stories with whole-number answers.

Each template draws its quantities so that every intermediate step is a whole number and
the answer is positive (as in GSM8K), and computes the answer alongside the text: the
row's `answer` is right by construction. The checker compares the final number.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from thrifty.errors import ThriftyError
from thrifty.grpo.rewards import RewardFunc, format_reward
from thrifty.grpo.tasks.common import CheckerReward, Row, Split, chat_prompt, numeric_check, sample_rows

SYSTEM_PROMPT = (
    "Solve the problem. Think step by step inside <think></think>, then give the final number "
    "inside <answer></answer>."
)

_NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Isla", "Jack", "Lena", "Maya",
          "Noah", "Omar", "Priya", "Ravi", "Sara", "Tom", "Uma", "Zoe")
_FRUITS = ("apples", "oranges", "pears", "plums", "lemons", "peaches")
_ITEMS = ("notebooks", "pens", "stickers", "marbles", "cards", "stamps")

Template = Callable[[random.Random], tuple[str, int]]


def _shop(rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    price, count = rng.randint(2, 15), rng.randint(2, 9)
    cost = price * count
    bill = rng.choice([b for b in (20, 50, 100, 200) if b > cost] or [cost + rng.randint(1, 50)])
    return (f"{name} buys {count} {item} that cost ${price} each and pays with ${bill}. "
            f"How many dollars of change does {name} get?"), bill - cost


def _harvest(rng: random.Random) -> tuple[str, int]:
    name, fruit = rng.choice(_NAMES), rng.choice(_FRUITS)
    have, bags, per_bag = rng.randint(3, 40), rng.randint(2, 8), rng.randint(3, 12)
    total = have + bags * per_bag
    gives = rng.randint(1, total - 1)
    return (f"{name} has {have} {fruit}. {name} picks {bags} more bags with {per_bag} {fruit} in each, "
            f"then gives {gives} {fruit} to a neighbour. How many {fruit} does {name} have now?"), total - gives


def _trip(rng: random.Random) -> tuple[str, int]:
    s1, h1, s2, h2 = rng.randint(3, 12) * 5, rng.randint(1, 5), rng.randint(3, 12) * 5, rng.randint(1, 5)
    return (f"A train travels at {s1} km per hour for {h1} hours, then at {s2} km per hour for {h2} hours. "
            "How many kilometres does it travel in total?"), s1 * h1 + s2 * h2


def _reading(rng: random.Random) -> tuple[str, int]:
    name = rng.choice(_NAMES)
    p1, d1, p2, d2 = rng.randint(5, 30), rng.randint(2, 7), rng.randint(5, 30), rng.randint(2, 7)
    read = p1 * d1 + p2 * d2
    book = read + rng.randint(1, 200)
    return (f"{name}'s book has {book} pages. {name} reads {p1} pages a day for {d1} days, then {p2} pages "
            f"a day for {d2} days. How many pages are left to read?"), book - read


def _savings(rng: random.Random) -> tuple[str, int]:
    name = rng.choice(_NAMES)
    weekly, weeks = rng.randint(3, 25), rng.randint(3, 12)
    spend = rng.randint(1, weekly * weeks - 1)
    return (f"{name} saves ${weekly} every week. After {weeks} weeks, {name} spends ${spend} on a gift. "
            f"How many dollars does {name} have left?"), weekly * weeks - spend


def _bakery(rng: random.Random) -> tuple[str, int]:
    box = rng.randint(3, 12)
    boxes = rng.randint(2, 15)
    per_tray = rng.choice([d for d in range(4, 25) if (box * boxes) % d == 0] or [box])
    trays = box * boxes // per_tray
    return (f"A baker makes {trays} trays of cookies with {per_tray} cookies on each tray. She packs them "
            f"into boxes of {box}. How many boxes does she fill?"), boxes


def _class_trip(rng: random.Random) -> tuple[str, int]:
    per_bus = rng.randint(20, 50)
    buses = rng.randint(2, 6)
    students = per_bus * buses - rng.randint(0, per_bus - 1)
    teachers = rng.randint(2, 8)
    people = students + teachers
    needed = -(-people // per_bus)
    return (f"{students} students and {teachers} teachers go on a trip. Each bus holds {per_bus} people. "
            "How many buses do they need?"), needed


def _ages(rng: random.Random) -> tuple[str, int]:
    a, b = rng.sample(_NAMES, 2)
    age, times, years = rng.randint(3, 15), rng.randint(2, 5), rng.randint(2, 20)
    return (f"{a} is {age} years old. {b} is {times} times as old as {a}. "
            f"How old will {b} be in {years} years?"), age * times + years


def _percent(rng: random.Random) -> tuple[str, int]:
    pct = rng.choice([10, 20, 25, 40, 50, 60, 75, 80])
    # The class size makes pct% a whole number and the rest even, so "half of the rest" is too.
    unit = {10: 20, 20: 10, 25: 8, 40: 10, 50: 4, 60: 10, 75: 8, 80: 10}[pct]
    size = unit * rng.randint(1, 8)
    walk = size * pct // 100
    return (f"A school club has {size} members. {pct}% of them walk to school and half of the rest take "
            "the bus. How many members take the bus?"), (size - walk) // 2


def _garden(rng: random.Random) -> tuple[str, int]:
    rows, per_row = rng.randint(3, 12), rng.randint(4, 15)
    dead = rng.randint(1, rows * per_row - 1)
    yield_ = rng.randint(2, 6)
    return (f"A garden has {rows} rows of tomato plants with {per_row} plants in each row. {dead} plants die. "
            f"Each remaining plant gives {yield_} tomatoes. How many tomatoes does the garden give?"), (rows * per_row - dead) * yield_


TEMPLATES: tuple[Template, ...] = (_shop, _harvest, _trip, _reading, _savings, _bakery, _class_trip, _ages,
                                   _percent, _garden)


@dataclass(frozen=True)
class GSMTask:
    """templates: which of the TEMPLATES (by index) to draw from; all by default."""

    name: ClassVar[str] = "gsm"
    templates: tuple[int, ...] | None = None
    eval_fraction: float = 0.1
    system_prompt: str = SYSTEM_PROMPT
    format_weight: float = 0.1

    def __post_init__(self) -> None:
        if self.templates is not None:
            object.__setattr__(self, "templates", tuple(self.templates))
            bad = [t for t in self.templates if not 0 <= t < len(TEMPLATES)]
            if bad or not self.templates:
                raise ThriftyError(f"gsm: templates must be indices 0..{len(TEMPLATES) - 1}; got {self.templates}.")

    def rows(self, split: Split, n: int, seed: int = 0) -> list[Row]:
        return sample_rows(self.name, split, n, seed, self.eval_fraction, self._make)

    def check(self, completion: Any, row: Mapping[str, Any]) -> bool:
        return numeric_check(completion, row)

    def reward_funcs(self) -> list[RewardFunc]:
        return [CheckerReward(self.check, "gsm_correct"), format_reward]

    def reward_weights(self) -> list[float]:
        return [1.0, self.format_weight]

    def _make(self, rng: random.Random) -> tuple[str, Row]:
        indices = self.templates if self.templates is not None else range(len(TEMPLATES))
        question, answer = TEMPLATES[rng.choice(list(indices))](rng)
        return question, {"prompt": chat_prompt(self.system_prompt, question), "answer": str(answer)}

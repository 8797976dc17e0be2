"""Arithmetic: "What is 37 + 8?", answered as <answer>45</answer>.

Sized for GRPO on a CPU with a ~100M-parameter model: short prompts, one-line answers,
difficulty set by the operands' digit counts. Measured baselines of SmolLM2-135M-Instruct
(temperature 0.7, 20 new tokens, lenient check): about 17% on 1-digit + 1-digit, 2-8% on
2-digit + 2-digit; it never used the <answer> tag unprompted by training, so the
correctness reward is lenient (the last number counts when there is no tag) and the
format reward is a small extra push towards the tag.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from thrifty.errors import ThriftyError
from thrifty.grpo.rewards import RewardFunc, completion_text, format_reward, regex_reward
from thrifty.grpo.tasks.common import CheckerReward, Row, Split, chat_prompt, numeric_check, safe_eval, sample_rows

SYSTEM_PROMPT = "Reply with the answer in the form <answer>NUMBER</answer>."
REASONING_SYSTEM_PROMPT = ("Think step by step inside <think></think>, then give the final number inside "
                           "<answer></answer>.")
_OPERATIONS = ("+", "-", "*", "/")
# The whole completion is the tag around an integer: what the format reward asks for.
ANSWER_ONLY_PATTERN = r"\s*<answer>\s*-?\d+\s*</answer>\s*"


@dataclass(frozen=True)
class ArithmeticTask:
    """operand_digits: digits of each operand, in order; its length is the number of operands
    ((2, 1): "37 + 8"). operations: drawn uniformly per operator. Subtraction never goes
    below zero unless allow_negative; division is always exact (the dividend is built as a
    product). strict: the checker also wants the answer inside <answer> tags.
    reasoning: the R1 format: the prompt asks for <think>...</think><answer>...</answer>, the
    checker wants the answer tag, the format reward is the strict think-then-answer one, and
    `trace(row)` writes a worked solution in that format (column addition or subtraction).
    steps_weight (reasoning only): the weight of a third reward, the share of the worked
    solution's lines the completion's <think> gets right (a process reward: it tells a
    completion with one wrong column from one that is wrong throughout, which the final
    answer alone does not). 0 leaves it out."""

    name: ClassVar[str] = "arithmetic"
    operand_digits: tuple[int, ...] = (2, 1)
    operations: tuple[str, ...] = ("+",)
    allow_negative: bool = False
    strict: bool = False
    # 20%: the default (2, 1) has only 810 problems, and a held-out set needs ~150 of them.
    eval_fraction: float = 0.2
    system_prompt: str = SYSTEM_PROMPT
    format_weight: float = 0.25
    reasoning: bool = False
    steps_weight: float = 0.0

    def __post_init__(self) -> None:
        # YAML gives lists (and maybe an int for digits); keep the dataclass hashable.
        digits = self.operand_digits
        object.__setattr__(self, "operand_digits", (digits, digits) if isinstance(digits, int) else tuple(digits))
        object.__setattr__(self, "operations", (self.operations,) if isinstance(self.operations, str) else tuple(self.operations))
        if len(self.operand_digits) < 2 or not all(1 <= d <= 9 for d in self.operand_digits):
            raise ThriftyError(f"arithmetic: operand_digits must list 2+ digit counts between 1 and 9; got {self.operand_digits}.")
        if self.reasoning and self.system_prompt == SYSTEM_PROMPT:
            object.__setattr__(self, "system_prompt", REASONING_SYSTEM_PROMPT)
        if self.steps_weight and not (self.reasoning and len(self.operand_digits) == 2
                                      and set(self.operations) <= {"+", "-"}):
            raise ThriftyError("arithmetic: steps_weight rewards the worked column method, written for "
                               "reasoning: true with two operands and + or - only.")
        bad = [op for op in self.operations if op not in _OPERATIONS]
        if bad or not self.operations:
            raise ThriftyError(f"arithmetic: operations must be some of {' '.join(_OPERATIONS)}; got {self.operations}.")

    def rows(self, split: Split, n: int, seed: int = 0) -> list[Row]:
        return sample_rows(self.name, split, n, seed, self.eval_fraction, self._make)

    def check(self, completion: Any, row: Mapping[str, Any]) -> bool:
        if self.strict or self.reasoning:
            text = completion_text(completion)
            if "<answer>" not in text:
                return False
        return numeric_check(completion, row)

    def reward_funcs(self) -> list[RewardFunc]:
        if self.reasoning:
            steps = [CheckerReward(self.steps_right, "worked_steps")] if self.steps_weight else []
            return [CheckerReward(self.check, "arithmetic_correct"), format_reward, *steps]
        return [CheckerReward(self.check, "arithmetic_correct"), regex_reward(ANSWER_ONLY_PATTERN, name="answer_format")]

    def follows_format(self, completion: Any) -> bool:
        """The completion has the form the prompt asks for (for format compliance)."""
        if self.reasoning:
            return format_reward([None], [completion])[0] == 1.0
        return re.fullmatch(ANSWER_ONLY_PATTERN, completion_text(completion), re.DOTALL) is not None

    def trace(self, row: Mapping[str, Any]) -> str:
        """A worked solution of the row's problem in the reasoning format: the column method,
        digit by digit with the carries (or borrows), then the answer."""
        return f"<think>\n{_worked_steps(row)}\n</think>\n<answer>{row['answer']}</answer>"

    def steps_right(self, completion: Any, row: Mapping[str, Any]) -> float:
        """The share of trace(row)'s <think> lines that the completion's <think> has at the
        same place: 1.0 for the whole worked solution, partial for one wrong column."""
        think = re.search(r"<think>(.*?)</think>", completion_text(completion), re.DOTALL)
        expected = _worked_steps(row).splitlines()
        written = think[1].strip().splitlines() if think else []
        return sum(a.strip() == b for a, b in zip(written, expected)) / len(expected)

    def reward_weights(self) -> list[float]:
        return [1.0, self.format_weight] + ([self.steps_weight] if self.steps_weight else [])

    def _make(self, rng: random.Random) -> tuple[str, Row]:
        while True:
            operands = [_number(rng, d) for d in self.operand_digits]
            ops = [rng.choice(self.operations) for _ in operands[1:]]
            if "/" in ops and len(operands) == 2:
                # Exact division: show (divisor * quotient) / divisor, both of the asked sizes.
                operands[0] = operands[0] * max(operands[1], 1)
                operands[1] = max(operands[1], 1)
            expression = " ".join(x for pair in zip(map(str, operands), [*ops, ""]) for x in pair).strip()
            result = safe_eval(expression)
            if result is None or result.value.denominator != 1:
                continue  # a zero divisor or an inexact division among 3+ operands: draw again
            if result.value < 0 and not self.allow_negative:
                continue
            answer = int(result.value)
            row = {"prompt": chat_prompt(self.system_prompt, f"What is {expression}?"), "answer": str(answer)}
            return expression.replace(" ", ""), row


def _worked_steps(row: Mapping[str, Any]) -> str:
    """The inside of a trace's <think>: the problem, then one line per column."""
    question = row["prompt"][-1]["content"]
    match = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", question)
    if match is None:
        raise ThriftyError(f"arithmetic: traces are written for two operands with + or -; got {question!r}.")
    a, op, b = int(match[1]), match[2], int(match[3])
    return f"{a} {op} {b}, column by column from the right:\n{_column_steps(a, b, op)}"


_PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions")


def _column_steps(a: int, b: int, op: str) -> str:
    """One line per column: the digits, the carry or borrow, the digit written."""
    lines, carry, digits = [], 0, []
    width = max(len(str(a)), len(str(b)))
    for i in range(width):
        x, y = a // 10**i % 10, b // 10**i % 10
        place = _PLACES[i] if i < len(_PLACES) else f"10^{i}"
        if op == "+":
            total = x + y + carry
            extra = f" + {carry}" if carry else ""
            written, carry = total % 10, total // 10
            note = f", write {written} carry {carry}" if carry else f", write {written}"
            lines.append(f"{place}: {x} + {y}{extra} = {total}{note}")
        else:
            need = x - carry
            borrow = 1 if need < y else 0
            top = need + 10 * borrow
            extra = f" - {carry}" if carry else ""
            written, carry = top - y, borrow
            note = f", borrow 1: {top} - {y} = {written}" if borrow else f" = {written}"
            lines.append(f"{place}: {x}{extra} - {y}{note}")
        digits.append(written)
    if op == "+" and carry:
        digits.append(carry)
        lines.append(f"carry {carry} becomes the next digit")
    value = int("".join(map(str, reversed(digits))))
    lines.append(f"so the result is {value}.")
    return "\n".join(lines)


def _number(rng: random.Random, digits: int) -> int:
    # 1-digit operands are 1..9: "0 + 7" teaches nothing.
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

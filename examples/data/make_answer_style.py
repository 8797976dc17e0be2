"""Generate answer_style.jsonl: short questions answered in one fixed style, "Answer: <x>".

A small instruction data set of our own making (every row comes from the templates
below, nothing copied) whose effect is easy to see and to check: the stock
SmolLM2-135M-Instruct answers "What is 23 + 19?" with a chatty sentence; after a
few minutes of LoRA on this data it answers "Answer: 42". Every answer is computed,
so the data is also correct, and a check is one regex away:

    re.fullmatch(r"Answer: \\S.*", reply)

Run: python examples/data/make_answer_style.py   (rewrites answer_style.jsonl next to it)
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

ROWS = 320
SEED = 7

WORDS = [
    "apple", "river", "garden", "pencil", "window", "planet", "yellow", "forest", "button", "rocket",
    "candle", "bridge", "turtle", "silver", "orange", "mountain", "teacher", "kitchen", "island", "dragon",
    "pocket", "winter", "summer", "basket", "castle", "mirror", "shadow", "violin", "tomato", "spider",
    "lemon", "cloud", "horse", "chair", "music", "ocean", "stone", "tiger", "bread", "light",
    "cat", "dog", "sun", "tree", "book", "lamp", "fish", "bird", "moon", "star",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    template = rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}.",
                           "What do you get when you add {a} to {b}?", "What is the sum of {a} and {b}?"])
    return template.format(a=a, b=b), str(a + b)


def subtraction(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(10, 90)
    b = rng.randint(1, a)
    template = rng.choice(["What is {a} - {b}?", "Subtract {b} from {a}.", "What is {a} minus {b}?",
                           "If you have {a} coins and spend {b}, how many are left?"])
    return template.format(a=a, b=b), str(a - b)


def multiplication(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 12), rng.randint(2, 10)
    template = rng.choice(["What is {a} times {b}?", "What is {a} x {b}?", "Multiply {a} by {b}.",
                           "How much is {b} groups of {a}?"])
    return template.format(a=a, b=b), str(a * b)


def comparison(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(1, 200), 2)
    if rng.random() < 0.5:
        return rng.choice(["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?"]).format(a=a, b=b), \
            str(max(a, b))
    return rng.choice(["Which is smaller, {a} or {b}?", "Which number is less: {a} or {b}?"]).format(a=a, b=b), \
        str(min(a, b))


def letter_count(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    template = rng.choice(['How many letters are in the word "{w}"?', 'Count the letters in "{w}".'])
    return template.format(w=word), str(len(word))


def capitals(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    template = rng.choice(['Write the word "{w}" in capital letters.', 'Spell "{w}" in upper case.'])
    return template.format(w=word), word.upper()


def first_letter(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    template = rng.choice(['What is the first letter of "{w}"?', 'Which letter does "{w}" start with?'])
    return template.format(w=word), word[0]


def sequence(rng: random.Random) -> tuple[str, str]:
    start, step = rng.randint(1, 20), rng.randint(2, 9)
    terms = [start + step * i for i in range(4)]
    template = rng.choice(["What comes next in the sequence {s}?", "Continue the pattern: {s}, ..."])
    return template.format(s=", ".join(map(str, terms))), str(start + step * 4)


def parity(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(1, 500)
    template = rng.choice(["Is {n} even or odd?", "Is the number {n} odd or even?"])
    return template.format(n=n), "even" if n % 2 == 0 else "odd"


def next_day(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(7)
    if rng.random() < 0.5:
        return f"What day comes after {DAYS[i]}?", DAYS[(i + 1) % 7]
    return f"What day comes before {DAYS[i]}?", DAYS[(i - 1) % 7]


def next_month(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(12)
    return rng.choice(["Which month comes after {m}?", "What month follows {m}?"]).format(m=MONTHS[i]), \
        MONTHS[(i + 1) % 12]


def weeks_to_days(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(1, 9)
    return rng.choice(["How many days are in {n} weeks?", "How many days make {n} weeks?"]).format(n=n), str(7 * n)


TASKS: list[Callable[[random.Random], tuple[str, str]]] = [
    addition, subtraction, multiplication, comparison, letter_count, capitals, first_letter, sequence, parity,
    next_day, next_month, weeks_to_days,
]


def make_rows(n: int = ROWS, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        question, answer = rng.choice(TASKS)(rng)
        if question in seen:
            continue  # every question once, so held-out rows are really unseen
        seen.add(question)
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": f"Answer: {answer}"}]})
    return rows


if __name__ == "__main__":
    out = Path(__file__).with_name("answer_style.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        for row in make_rows():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {ROWS} rows to {out}")

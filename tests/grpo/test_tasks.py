"""Built-in tasks: seeded, disjoint splits, exact checkers, solvable countdowns, safe parsing."""

from __future__ import annotations

import itertools
import subprocess
import sys
from fractions import Fraction

import pytest

from thrifty.errors import ThriftyError
from thrifty.grpo.rewards import call_reward_function
from thrifty.grpo.tasks import available_tasks, get_task
from thrifty.grpo.tasks.common import safe_eval, split_of
from thrifty.grpo.tasks.countdown import check_expression

TASKS = ["arithmetic", "countdown", "gsm"]


def question(row) -> str:
    return row["prompt"][-1]["content"]


@pytest.mark.parametrize("name", TASKS)
def test_rows_are_seeded_distinct_and_well_formed(name):
    task = get_task(name)
    rows = task.rows("train", 200, seed=7)
    assert rows == task.rows("train", 200, seed=7)
    assert rows[:50] == task.rows("train", 50, seed=7)  # prefix-stable
    assert rows != task.rows("train", 200, seed=8)
    assert len({question(r) for r in rows}) == 200
    for row in rows[:20]:
        system, user = row["prompt"]
        assert system["role"] == "system" and "<answer>" in system["content"] and user["role"] == "user"
        assert isinstance(row["answer"], str)


@pytest.mark.parametrize("name", TASKS)
def test_train_and_eval_do_not_overlap(name):
    task = get_task(name)
    train = {question(r) for r in task.rows("train", 500, seed=0)}
    held_out = {question(r) for r in task.rows("eval", 60, seed=0)}
    other_seed = {question(r) for r in task.rows("eval", 60, seed=1)}
    assert not train & held_out and not train & other_seed


@pytest.mark.parametrize("name", TASKS)
def test_checker_accepts_the_answer_and_rejects_wrong_ones(name):
    task = get_task(name)
    for row in task.rows("eval", 40, seed=0):
        answer = row["answer"]
        assert task.check(f"<think>working</think>\n<answer>{answer}</answer>", row)
        assert task.check([{"role": "assistant", "content": f"<answer>{answer}</answer>"}], row)
        assert not task.check("<answer>100000</answer>", row)
        assert not task.check("", row)
        assert not task.check(f"<answer>{answer}</answer> <answer>99999</answer>", row)  # the last tag counts


@pytest.mark.parametrize("name", TASKS)
def test_default_rewards_run_through_the_guard(name):
    task = get_task(name)
    rows = task.rows("train", 4, seed=0)
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    prompts = [r["prompt"] for r in rows]
    completions = [f"<think>ok</think><answer>{r['answer']}</answer>" for r in rows[:2]] + ["no", "<answer>-1</answer>"]
    funcs, weights = task.reward_funcs(), task.reward_weights()
    assert len(funcs) == len(weights)
    correct = call_reward_function(funcs[0], prompts, completions, None, columns)
    assert correct == [1.0, 1.0, 0.0, 0.0]


def test_arithmetic_settings():
    task = get_task("arithmetic", operand_digits=[2, 2], operations=["+", "-", "*", "/"])
    for row in task.rows("train", 200, seed=0):
        a, op, b = question(row).removeprefix("What is ").removesuffix("?").split()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": Fraction(int(a), int(b))}[op]
        assert value == int(row["answer"]) and int(row["answer"]) >= 0
    three = get_task("arithmetic", operand_digits=(1, 1, 1), operations=("+", "*"))
    row = three.rows("train", 1)[0]
    assert len(question(row).split()) == 7  # "What is a op b op c?"
    assert safe_eval(question(row).removeprefix("What is ").removesuffix("?")).value == int(row["answer"])


def test_arithmetic_lenient_and_strict_checks():
    row = {"answer": "45"}
    lenient, strict = get_task("arithmetic"), get_task("arithmetic", strict=True)
    assert lenient.check("37 + 8 = 45", row) and not strict.check("37 + 8 = 45", row)
    assert strict.check("<answer>45</answer>", row) and strict.check("<answer> $45. </answer>", row)
    assert not lenient.check("45 + 1 = 46", row)


def test_too_few_problems_is_a_clear_error():
    with pytest.raises(ThriftyError, match="distinct eval problems"):
        get_task("arithmetic", operand_digits=(1, 1)).rows("eval", 50)


def _solvable(numbers: list[int], target: int) -> bool:
    """Independent brute force: combine any two of the remaining values (subsets allowed)."""
    def search(values: tuple[Fraction, ...]) -> bool:
        if target in values:
            return True
        for i, j in itertools.permutations(range(len(values)), 2):
            a, b = values[i], values[j]
            rest = tuple(v for k, v in enumerate(values) if k not in (i, j))
            results = [a + b, a - b, a * b] + ([a / b] if b else [])
            if any(search(rest + (r,)) for r in results):
                return True
        return False
    return search(tuple(Fraction(n) for n in numbers))


def test_countdown_is_always_solvable():
    task = get_task("countdown", num_numbers=3, max_number=20, use_all=True)
    rows = task.rows("train", 300, seed=0) + task.rows("eval", 30, seed=0)
    for row in rows:
        assert task.check(f"<answer>{row['answer']}</answer>", row)  # the witness uses all numbers once
        assert task.min_target <= row["target"] <= task.max_target
    for row in rows[:15]:
        assert _solvable(row["numbers"], row["target"])


def test_countdown_checker_rules():
    numbers, target = [3, 5, 7, 7], 22
    assert check_expression("3 * 5 + 7", numbers, target)
    assert check_expression("(7 + 7) + 3 + 5 = 22", numbers, target)
    assert check_expression("3×5+7", numbers, target)
    assert not check_expression("3 * 5 + 7 = 23", numbers, target)  # wrong right-hand side
    assert not check_expression("3 * 5 + 7", numbers, target, use_all=True)  # one 7 unused
    assert not check_expression("7 + 7 + 7 + 1", numbers, target)  # 7 used three times, 1 not given
    assert not check_expression("3 * 5 + 8 - 1", numbers, target)  # numbers not given
    assert not check_expression("22", numbers, target)
    assert not check_expression("5 * 5 - 3", numbers, target)  # 5 twice
    assert not check_expression("7 / (5 - 5) + 22", numbers, target)


@pytest.mark.parametrize("text", [
    "__import__('os').system('true')", "2 ** 100000", "(lambda: 1)()", "open('x')", "1e3", "-3 + 25",
    "3.0 * 5", "9 // 2", "1" * 300, "(" * 150 + "1" + ")" * 150, "[1, 2]", "a + 1", "",
])
def test_safe_eval_rejects_everything_else(text):
    assert safe_eval(text) is None


def test_safe_eval_values():
    assert safe_eval("(1 + 2) * 3 / 4").value == Fraction(9, 4)
    assert safe_eval("10 - 2 - 3").numbers == (10, 2, 3)
    assert safe_eval("1 / 0") is None


def test_split_partition_is_stable():
    assert split_of("37+48", 0.1) == split_of("37+48", 0.1)
    assert sum(split_of(str(i), 0.1) == "eval" for i in range(5000)) == pytest.approx(500, abs=80)


def test_registry():
    assert {"arithmetic", "countdown", "gsm"} <= set(available_tasks())
    with pytest.raises(ThriftyError, match="unknown task 'sudoku'"):
        get_task("sudoku")
    with pytest.raises(ThriftyError, match="no setting digits"):
        get_task("arithmetic", digits=2)
    with pytest.raises(ThriftyError, match="operations"):
        get_task("arithmetic", operations=("^",))


def test_reasoning_gym_tasks_score_with_reasoning_gyms_own_checker():
    """reasoning-gym (a test dependency) as a task: disjoint splits, its questions as chat
    prompts, and rewards from its own score_answer for the answer in the tags."""
    task = get_task("reasoning_gym:leg_counting")
    train, held_out = task.rows("train", 40, seed=1), task.rows("eval", 20, seed=0)
    assert not {question(r) for r in train} & {question(r) for r in held_out}
    assert all("legs" in question(r) for r in train)
    right = [f"<think>count</think><answer>{r['answer']}</answer>" for r in train]
    wrong = [f"<think>count</think><answer>{int(r['answer']) + 1}</answer>" for r in train]
    columns = {k: [r[k] for r in train] * 2 for k in ("answer", "question", "metadata")}
    score, fmt = task.reward_funcs()
    assert score(None, right + wrong, **columns) == [1.0] * 40 + [0.0] * 40
    assert fmt(None, right) == [1.0] * 40
    assert all(task.check(c, r) for c, r in zip(right, train)) and not any(task.check(c, r) for c, r in zip(wrong, train))
    with pytest.raises(ThriftyError, match="reasoning_gym:no_such_set: reasoning-gym could not create it"):
        get_task("reasoning_gym:no_such_set")


def test_reasoning_gym_missing_is_a_clear_error():
    """Without the package (its import blocked in a fresh interpreter) the task names it."""
    script = ("import sys; sys.modules['reasoning_gym'] = None\n"
              "from thrifty.grpo.tasks import get_task\n"
              "get_task('reasoning_gym:leg_counting')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "pip install reasoning-gym" in done.stderr

"""Reward functions: parsing edge cases, both completion formats, and the calling guard."""

from __future__ import annotations

import functools
import math
import pickle
from fractions import Fraction

import pytest

from thrifty.errors import ThriftyError
from thrifty.grpo.rewards import (
    call_reward_function,
    completion_text,
    exact_answer_reward,
    extract_answer,
    format_reward,
    length_penalty,
    normalize_answer,
    numeric_answer_reward,
    parse_number,
    regex_reward,
    reward_function_name,
    soft_format_reward,
    soft_overlong_penalty,
)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def test_completion_text_accepts_strings_and_messages():
    assert completion_text("hi") == "hi"
    assert completion_text(chat("hi")) == "hi"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "image"}]}]) == "a"
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "tool", "content": "x"},
                            {"role": "assistant", "content": "b"}]) == "a\nb"
    with pytest.raises(ThriftyError):
        completion_text(42)


@pytest.mark.parametrize(("text", "expected"), [
    ("The answer is 85.", 85), ("1,234,567", 1234567), ("costs $1,234.50.", Fraction("1234.5")),
    ("x = -3", -3), ("10-3", 3), ("10 - 3", 3), ("-$5", -5), ("0.5", Fraction(1, 2)), ("−7", -7),
    ("85, which is it", 85), ("first 3 then 4", 4), ("no digits", None), ("12,34", None), ("84/4", 4),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_extract_and_normalize():
    assert extract_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"
    assert extract_answer("no tag") is None
    assert normalize_answer("  \\boxed{Paris}. ") == "paris"
    assert normalize_answer('"New   York."') == "new york"


@pytest.mark.parametrize(("completion", "strict", "soft"), [
    ("<think>add</think><answer>85</answer>", 1.0, 1.0),
    ("\n<think>\nadd\n</think>\n\n<answer>\n85\n</answer>\n", 1.0, 1.0),
    ("Sure! <think>add</think><answer>85</answer>", 0.0, 1.0),
    ("<think>add</think><answer>85</answer> Hope this helps", 0.0, 1.0),
    ("<think></think><answer>85</answer>", 0.0, 1.0),
    ("<think>a</think><think>b</think><answer>85</answer>", 0.0, 1.0),
    ("<think>add</think>", 0.0, 0.0),
    ("<answer>85</answer><think>add</think>", 0.0, 0.0),
])
def test_format_rewards(completion, strict, soft):
    assert format_reward(None, [completion]) == [strict]
    assert format_reward(None, [chat(completion)]) == [strict]
    assert soft_format_reward(None, [completion]) == [soft]


def test_regex_reward():
    f = regex_reward(r"<answer>\d+</answer>", reward=0.5, name="tag")
    assert f(None, ["<answer>12</answer>", " <answer>12</answer>\n", "x <answer>12</answer>"]) == [0.5, 0.5, 0.0]
    g = regex_reward(r"<answer>\d+</answer>", full_match=False)
    assert g(None, ["x <answer>12</answer>"]) == [1.0]
    assert reward_function_name(f) == "tag" and reward_function_name(g) == "regex_reward"
    assert pickle.loads(pickle.dumps(f))(None, ["<answer>1</answer>"]) == [0.5]
    with pytest.raises(ThriftyError, match="not a valid regular expression"):
        regex_reward("(")


def test_exact_answer_reward():
    completions = ["<answer> Paris. </answer>", "blah\nparis", "It is Paris, I think", "<answer>Lyon</answer>\nParis",
                   "so the total is 1,200.", "x", "anything"]
    answers = ["paris", "Paris", "Paris", "Paris", "1200", "x", None]
    assert exact_answer_reward(None, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, None]
    with pytest.raises(ThriftyError, match="`answer` column"):
        exact_answer_reward(None, ["a"])


def test_numeric_answer_reward():
    completions = ["37 + 48 = 85", "The answer is $85.", "<answer>85.0</answer> (not 86)", "<answer>86</answer> 85",
                   chat("85"), "eighty-five", "-4", "1,200", "#### 72"]
    answers = ["85", 85, "85", "85", "85", "85", "-4", "The total is 1200.", "#### 72"]
    assert numeric_answer_reward(None, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert numeric_answer_reward(None, ["5"], answer=["no number"]) == [None]
    assert numeric_answer_reward(None, ["0.3"], answer=[0.3]) == [0.0]  # 0.3 as a float is not exactly 3/10
    assert numeric_answer_reward(None, ["0.5"], answer=[0.5]) == [1.0]


def test_soft_overlong_penalty():
    f = soft_overlong_penalty(max_completion_length=10, cache=4)
    ids = [[0] * n for n in (0, 6, 7, 8, 10, 12)]
    assert f(None, ["x"] * 6, completion_ids=ids) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    with pytest.raises(ThriftyError, match="completion_ids"):
        f(None, ["x"])
    with pytest.raises(ThriftyError, match="cache"):
        soft_overlong_penalty(10, 11)


def test_length_penalty():
    f = length_penalty(target_length=3, penalty_per_token=0.1, max_penalty=0.5)
    assert f(None, ["x"] * 3, completion_ids=[[1, 2], [1] * 5, [1] * 30]) == [0.0, pytest.approx(-0.2), -0.5]


# ----------------------------------------------------------------------------- the guard


def test_call_reward_function_passes_columns_and_converts():
    def graded(prompts, completions, completion_ids, answer, **kw):
        return [1, None, float("nan"), True][: len(completions)]

    out = call_reward_function(graded, ["p"] * 4, ["a", "b", "c", "d"], [[1]] * 4, {"answer": ["x"] * 4})
    assert out == [1.0, None, None, 1.0]


def bad_length(prompts, completions, **kw):
    return [1.0]


def bad_value(prompts, completions, **kw):
    return [1.0, "high"]


def crashes_on_second(prompts, completions, **kw):
    return [1.0 / (len(c) - 5) for c in completions]


def returns_dict(prompts, completions, **kw):
    return {"r": 1.0}


def test_call_reward_function_errors_name_function_and_sample():
    prompts = [[{"role": "user", "content": "What is 2+2?"}], [{"role": "user", "content": "What is 3+3?"}]]
    completions = ["four!", "five"]
    with pytest.raises(ThriftyError, match=r"'bad_length' returned 1 rewards for 2 completions"):
        call_reward_function(bad_length, prompts, completions)
    with pytest.raises(ThriftyError, match=r"(?s)'bad_value' returned 'high'.*sample 1.*3\+3.*five") as e:
        call_reward_function(bad_value, prompts, completions)
    assert "user: What is 3+3?" in str(e.value)
    with pytest.raises(ThriftyError, match=r"(?s)'crashes_on_second' raised ZeroDivisionError.*sample 1.*five"):
        call_reward_function(crashes_on_second, prompts, ["forty!", "fiver"])
    with pytest.raises(ThriftyError, match="'returns_dict' returned dict"):
        call_reward_function(returns_dict, prompts, completions)
    with pytest.raises(ThriftyError, match="'bad_value'"):
        call_reward_function(functools.partial(bad_value), prompts, completions)
    with pytest.raises(ThriftyError, match="finite"):
        call_reward_function(lambda prompts, completions, **kw: [math.inf, 0.0], prompts, completions)


def test_long_samples_are_truncated_in_errors():
    with pytest.raises(ThriftyError) as e:
        call_reward_function(bad_value, ["p", "p"], ["x", "y" * 5000])
    assert len(str(e.value)) < 1200 and "chars)" in str(e.value)

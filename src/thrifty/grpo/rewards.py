"""Reward functions for GRPO, with TRL's signature, and the guard that calls them.

Signature (TRL's): `f(prompts, completions, completion_ids=None, **columns) -> list[float | None]`,
one reward per completion; `columns` are the dataset's other columns (e.g. `answer`),
one value per completion. None means "does not apply to this sample": it is left out of
that function's statistics and of the weighted sum (see grpo/loss.py, combine_rewards).
Completions are strings, or TRL's conversational form, a list of messages
`[{"role": "assistant", "content": "..."}]`; every function here accepts both.

Factories (`regex_reward`, `soft_overlong_penalty`, `length_penalty`) return small
callable objects rather than closures, so they pickle (spawned workers) and carry a
`__name__` for the per-function log lines.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from thrifty.errors import ThriftyError

RewardFunc = Callable[..., Sequence[float | None]]

# ---------------------------------------------------------------------------- text helpers


def completion_text(completion: Any) -> str:
    """The text of one completion: the string itself, or the assistant messages' contents joined.

    Message content may be a string or a list of parts ({"type": "text", "text": ...}), as
    in multimodal chat formats; non-text parts are skipped.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        completion = [completion]
    if isinstance(completion, Sequence):
        texts = []
        for message in completion:
            if not isinstance(message, Mapping):
                raise ThriftyError(f"a completion must be a string or a list of chat messages; got an element {message!r}.")
            if message.get("role", "assistant") != "assistant":
                continue
            texts.append(_content_text(message.get("content")))
        return "\n".join(texts)
    raise ThriftyError(f"a completion must be a string or a list of chat messages; got {type(completion).__name__}.")


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, Mapping) and part.get("type") == "text")


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """The content of the last <answer>...</answer>, stripped; None if there is none."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


# A number as people write it: a sign glued to it (not after a digit, so "10-3" is 10 and
# 3, and not after a space, so "10 - 3" is not -3), optional $, thousands commas or plain
# digits, optional decimals. A trailing full stop is not a decimal point (needs a digit).
# No "a/b" fractions on purpose: "84/4" would then equal 21, and a policy echoing the
# question would be rewarded.
_NUMBER = re.compile(r"(?<![\w.,])(?P<sign>[-+−])?\$?(?P<int>(?>\d{1,3}(?:,\d{3})+|\d+))(?P<frac>\.\d+)?(?![\d,]\d)")


def parse_number(text: str) -> Fraction | None:
    """The last number in `text` as an exact Fraction ("1,234", "$5", "-3.5", "12."); None if none.

    Exact fractions, not floats, so "0.1 + 0.2"-style rounding can never flip a reward.
    """
    last = None
    for last in _NUMBER.finditer(text):
        pass
    if last is None:
        return None
    value = Fraction(last["int"].replace(",", "") + (last["frac"] or ""))
    return -value if last["sign"] in ("-", "−") else value


def _reference_number(value: Any) -> Fraction | None:
    """The reference answer as a number: int/float as is; a string by its last number
    (so GSM8K's "... #### 72" works)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        return Fraction(value) if math.isfinite(value) else None
    return parse_number(str(value))


def normalize_answer(text: str) -> str:
    """Case, spacing and decoration-insensitive form used by exact_answer_reward:
    lower case, whitespace collapsed, surrounding quotes/`$`/`**`, a trailing period, and
    a LaTeX \\boxed{...} wrapper removed."""
    s = text.strip().rstrip(".").strip()
    boxed = re.fullmatch(r"\\boxed\{(.*)\}", s, re.DOTALL)
    if boxed:
        s = boxed.group(1)
    s = re.sub(r"\s+", " ", s).strip()
    s = s.strip("*`\"'$ ").rstrip(".").strip()
    return s.casefold()


# ---------------------------------------------------------------------------- format rewards

# Strict: the whole completion is one think block then one answer block, nothing else.
_STRICT_FORMAT = re.compile(r"\s*<think>(?:(?!</?think>).)+?</think>\s*<answer>(?:(?!</?answer>).)+?</answer>\s*", re.DOTALL)
# Soft: the pair appears somewhere, in order.
_SOFT_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                  **columns: Any) -> list[float | None]:
    """1.0 if the completion is exactly `<think>...</think>` then `<answer>...</answer>`
    (whitespace allowed around and between, each tag once, both non-empty), else 0.0."""
    return [1.0 if _STRICT_FORMAT.fullmatch(completion_text(c)) else 0.0 for c in completions]


def soft_format_reward(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                       **columns: Any) -> list[float | None]:
    """1.0 if `<think>...</think>` followed by `<answer>...</answer>` appears anywhere, else 0.0."""
    return [1.0 if _SOFT_FORMAT.search(completion_text(c)) else 0.0 for c in completions]


def regex_reward(pattern: str, *, reward: float = 1.0, miss: float = 0.0, full_match: bool = True,
                 flags: int = re.DOTALL, name: str = "regex_reward") -> RegexReward:
    """A reward function: `reward` when the completion matches `pattern`, else `miss`.

    full_match=True needs the whole completion (outer whitespace stripped) to match;
    False accepts a match anywhere. `name` is what the logs call it.
    """
    try:
        re.compile(pattern, flags)
    except re.error as e:
        raise ThriftyError(f"regex_reward: the pattern {pattern!r} is not a valid regular expression ({e}).") from e
    return RegexReward(pattern, reward, miss, full_match, flags, name)


@dataclass(frozen=True)
class RegexReward:
    pattern: str
    reward: float
    miss: float
    full_match: bool
    flags: int
    name: str

    @property
    def __name__(self) -> str:  # type: ignore[override]
        return self.name

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                 **columns: Any) -> list[float | None]:
        regex = re.compile(self.pattern, self.flags)
        match = regex.fullmatch if self.full_match else regex.search
        return [self.reward if match(completion_text(c).strip()) else self.miss for c in completions]


# ---------------------------------------------------------------------------- answer rewards


def exact_answer_reward(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, *,
                        answer: Sequence[Any] | None = None, **columns: Any) -> list[float | None]:
    """1.0 if the completion's answer equals the `answer` column after normalize_answer, else 0.0.

    The completion's answer is the content of its last <answer> tag; without one, its last
    non-empty line, and failing that (for numeric references) its last number. None where
    the reference is None (nothing to compare with).
    """
    answers = _answer_column("exact_answer_reward", answer, len(completions))
    rewards: list[float | None] = []
    for completion, ref in zip(completions, answers):
        if ref is None:
            rewards.append(None)
            continue
        text, target = completion_text(completion), normalize_answer(str(ref))
        tagged = extract_answer(text)
        if tagged is not None:
            rewards.append(1.0 if normalize_answer(tagged) == target else 0.0)
            continue
        lines = [line for line in text.splitlines() if line.strip()]
        if lines and normalize_answer(lines[-1]) == target:
            rewards.append(1.0)
            continue
        ref_number, number = _reference_number(ref), parse_number(text)
        rewards.append(1.0 if ref_number is not None and number == ref_number and _is_plain_number(str(ref)) else 0.0)
    return rewards


def _is_plain_number(text: str) -> bool:
    return _NUMBER.fullmatch(text.strip().rstrip(".")) is not None


def numeric_answer_reward(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, *,
                          answer: Sequence[Any] | None = None, **columns: Any) -> list[float | None]:
    """1.0 if the final number of the completion equals the `answer` column numerically, else 0.0.

    The final number is taken inside the last <answer> tag when there is one, else in the
    whole completion; commas, `$` and a trailing period are understood,
    and the comparison is exact ("85.0" == "85"). None where the reference has no number.
    """
    answers = _answer_column("numeric_answer_reward", answer, len(completions))
    rewards: list[float | None] = []
    for completion, ref in zip(completions, answers):
        target = _reference_number(ref)
        if target is None:
            rewards.append(None)
            continue
        text = completion_text(completion)
        tagged = extract_answer(text)
        got = parse_number(text if tagged is None else tagged)
        rewards.append(1.0 if got is not None and got == target else 0.0)
    return rewards


def _answer_column(func: str, answer: Sequence[Any] | None, n: int) -> Sequence[Any]:
    if answer is None:
        raise ThriftyError(
            f"{func} compares with the dataset's `answer` column, but the dataset has none: "
            "add an `answer` column (one reference answer per prompt) or use another reward function."
        )
    if isinstance(answer, (str, bytes)) or len(answer) != n:
        raise ThriftyError(f"{func}: the `answer` column must hold one answer per completion ({n}).")
    return answer


# ---------------------------------------------------------------------------- length rewards


def soft_overlong_penalty(max_completion_length: int, cache: int) -> SoftOverlongPenalty:
    """A reward function: DAPO's soft overlong punishment, on completion token counts L:
    0 while L <= max_completion_length - cache, then linearly down to -1 at
    L = max_completion_length, and -1 beyond. Needs completion_ids."""
    if not 0 < cache <= max_completion_length:
        raise ThriftyError(
            f"soft_overlong_penalty: cache ({cache}) must be in 1..max_completion_length "
            f"({max_completion_length}); DAPO used 4096 of 20480."
        )
    return SoftOverlongPenalty(max_completion_length, cache)


@dataclass(frozen=True)
class SoftOverlongPenalty:
    max_completion_length: int
    cache: int

    @property
    def __name__(self) -> str:  # type: ignore[override]
        return "soft_overlong_penalty"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None,
                 **columns: Any) -> list[float | None]:
        start = self.max_completion_length - self.cache
        rewards: list[float | None] = []
        for length in _lengths("soft_overlong_penalty", completion_ids, len(completions)):
            if length <= start:
                rewards.append(0.0)
            elif length <= self.max_completion_length:
                rewards.append((start - length) / self.cache)
            else:
                rewards.append(-1.0)
        return rewards


def length_penalty(target_length: int, penalty_per_token: float = 0.01, max_penalty: float = 1.0) -> LengthPenalty:
    """A reward function: -penalty_per_token for every completion token beyond target_length,
    at most -max_penalty; 0 within target_length. A gentle push against rambling on tasks
    with a short answer. Needs completion_ids."""
    if target_length < 0 or penalty_per_token < 0 or max_penalty < 0:
        raise ThriftyError("length_penalty: target_length, penalty_per_token and max_penalty must be >= 0.")
    return LengthPenalty(target_length, penalty_per_token, max_penalty)


@dataclass(frozen=True)
class LengthPenalty:
    target_length: int
    penalty_per_token: float
    max_penalty: float

    @property
    def __name__(self) -> str:  # type: ignore[override]
        return "length_penalty"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None,
                 **columns: Any) -> list[float | None]:
        return [-min(self.max_penalty, self.penalty_per_token * max(0, n - self.target_length))
                for n in _lengths("length_penalty", completion_ids, len(completions))]


def _lengths(func: str, completion_ids: Sequence[Sequence[int]] | None, n: int) -> list[int]:
    if completion_ids is None:
        raise ThriftyError(f"{func} measures completion_ids (token ids), but none were passed: call it with completion_ids=.")
    if len(completion_ids) != n:
        raise ThriftyError(f"{func}: {len(completion_ids)} completion_ids for {n} completions.")
    return [len(ids) for ids in completion_ids]


# ---------------------------------------------------------------------------- calling them safely


def reward_function_list(reward_funcs: Any) -> list[RewardFunc]:
    """TRL's reward_funcs as a list: one function, or a list of them. A string (TRL's way to
    name a reward model) is one entry, not a sequence of characters, and is refused with
    what to pass instead, as is anything that cannot be called."""
    funcs = [reward_funcs] if callable(reward_funcs) or isinstance(reward_funcs, (str, Path)) else list(reward_funcs)
    for i, func in enumerate(funcs):
        if isinstance(func, (str, Path)):
            raise ThriftyError(f"reward_funcs[{i}] is {str(func)!r}: reward models (a model id or directory) are not "
                               "supported yet; pass Python functions (completions, **columns) -> list of floats.")
        if not callable(func):
            raise ThriftyError(f"reward_funcs[{i}] is a {type(func).__name__}, not a function; pass Python functions "
                               "(completions, **columns) -> list of floats.")
    return funcs


def reward_function_name(func: Any) -> str:
    """The name logs use: `__name__`, else the wrapped function's (functools.partial), else the class's."""
    name = getattr(func, "__name__", None) or getattr(getattr(func, "func", None), "__name__", None)
    return name or type(func).__name__


def call_reward_function(func: RewardFunc, prompts: Sequence[Any], completions: Sequence[Any],
                         completion_ids: Sequence[Sequence[int]] | None = None,
                         columns: Mapping[str, Any] | None = None) -> list[float | None]:
    """Call a reward function and check what it returned: one real number or None per completion.

    NaN counts as None. Anything else (wrong length, a string, an infinity, an exception)
    raises ThriftyError naming the function and showing the offending prompt and completion,
    because a bad reward silently poisons every advantage of its group.
    """
    name = reward_function_name(func)
    columns = dict(columns or {})
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} completions.")
    try:
        out = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    except ThriftyError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the context the user needs
        i = _first_failing_sample(func, prompts, completions, completion_ids, columns)
        raise ThriftyError(
            f"reward function '{name}' raised {type(e).__name__}: {e}\n"
            f"{_show_sample(prompts, completions, i)}\nFix the function so it handles this input "
            "(return None for samples it cannot score)."
        ) from e
    if out is None or isinstance(out, (str, bytes, Mapping)) or not hasattr(out, "__len__"):
        raise ThriftyError(
            f"reward function '{name}' returned {type(out).__name__}; it must return a list with one "
            f"float (or None) per completion ({n})."
        )
    if hasattr(out, "tolist"):  # tensors and numpy arrays
        out = out.tolist()
    if len(out) != n:
        raise ThriftyError(
            f"reward function '{name}' returned {len(out)} rewards for {n} completions; it must return "
            f"exactly one per completion, in order.\n{_show_sample(prompts, completions, 0)}"
        )
    rewards: list[float | None] = []
    for i, value in enumerate(out):
        reward = _as_reward(value)
        if reward is _BAD:
            raise ThriftyError(
                f"reward function '{name}' returned {value!r} ({type(value).__name__}) for sample {i}; "
                f"rewards must be finite numbers, or None when the function does not apply.\n"
                f"{_show_sample(prompts, completions, i)}"
            )
        rewards.append(reward)  # type: ignore[arg-type]
    return rewards


_BAD = object()


def _as_reward(value: Any) -> float | None | object:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        return _BAD
    try:
        x = float(value)
    except (TypeError, ValueError):
        return _BAD
    if math.isnan(x):
        return None
    return x if math.isfinite(x) else _BAD


def _first_failing_sample(func: RewardFunc, prompts: Sequence[Any], completions: Sequence[Any],
                          completion_ids: Sequence[Sequence[int]] | None, columns: Mapping[str, Any]) -> int:
    # Only on the error path: re-run one sample at a time to point at the culprit.
    n = len(completions)
    for i in range(n):
        cols = {k: [v[i]] if isinstance(v, Sequence) and not isinstance(v, str) and len(v) == n else v
                for k, v in columns.items()}
        ids = None if completion_ids is None else [completion_ids[i]]
        try:
            func(prompts=[prompts[i]], completions=[completions[i]], completion_ids=ids, **cols)
        except Exception:  # noqa: BLE001
            return i
    return 0


def _show_sample(prompts: Sequence[Any], completions: Sequence[Any], i: int, limit: int = 300) -> str:
    return (f"  sample {i}:\n    prompt: {_shorten(_prompt_text(prompts[i]), limit)}\n"
            f"    completion: {_shorten(completion_text(completions[i]) if _is_completion(completions[i]) else repr(completions[i]), limit)}")


def _is_completion(c: Any) -> bool:
    try:
        completion_text(c)
        return True
    except ThriftyError:
        return False


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
        return " | ".join(f"{m.get('role', '?')}: {_content_text(m.get('content'))}" for m in prompt)
    return repr(prompt)


def _shorten(text: str, limit: int) -> str:
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 20] + f"... ({len(text)} chars)"

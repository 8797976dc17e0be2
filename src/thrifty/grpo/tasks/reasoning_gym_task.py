"""`reasoning_gym:<dataset>`: any reasoning-gym generator as a task, when the package is installed.

reasoning-gym (pip install reasoning-gym) makes seeded procedural datasets whose entries
are {"question", "answer", "metadata"} and scores answers with `dataset.score_answer`.
Splits use the same hash-of-question partition as the built-in tasks, so train and eval
never overlap. reasoning-gym is optional for users and a test dependency, so CI runs it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from thrifty.errors import ThriftyError
from thrifty.grpo.rewards import RewardFunc, completion_text, extract_answer, format_reward
from thrifty.grpo.tasks.common import Row, Split, chat_prompt, sample_rows

SYSTEM_PROMPT = (
    "Think step by step inside <think></think>, then give only the final answer inside <answer></answer>."
)
_BATCH = 64  # entries generated per call to reasoning-gym while filling a split


def import_reasoning_gym() -> Any:
    try:
        import reasoning_gym  # type: ignore[import-not-found]
    except ImportError as e:
        raise ThriftyError(
            "tasks named 'reasoning_gym:<dataset>' need the reasoning-gym package, which is not installed: "
            "pip install reasoning-gym (or use a built-in task: arithmetic, countdown, gsm)."
        ) from e
    return reasoning_gym


@dataclass
class ReasoningGymTask:
    """dataset: a reasoning-gym dataset name (e.g. "leg_counting"); config: its generator settings."""

    dataset: str
    config: dict[str, Any] = field(default_factory=dict)
    eval_fraction: float = 0.1
    system_prompt: str = SYSTEM_PROMPT
    format_weight: float = 0.1

    def __post_init__(self) -> None:
        rg = import_reasoning_gym()
        try:
            self._scorer = rg.create_dataset(self.dataset, size=1, seed=0, **self.config)
        except Exception as e:  # noqa: BLE001 - unknown dataset names raise various errors
            raise ThriftyError(f"reasoning_gym:{self.dataset}: reasoning-gym could not create it ({e}). "
                               "Check the dataset name and its settings.") from e

    @property
    def name(self) -> str:
        return f"reasoning_gym:{self.dataset}"

    def rows(self, split: Split, n: int, seed: int = 0) -> list[Row]:
        rg = import_reasoning_gym()
        entries: list[dict[str, Any]] = []

        def make(rng: random.Random) -> tuple[str, Row]:
            if not entries:
                batch = rg.create_dataset(self.dataset, size=_BATCH, seed=rng.randrange(2**31), **self.config)
                entries.extend(batch[i] for i in range(len(batch)))
            entry = entries.pop()
            row = {"prompt": chat_prompt(self.system_prompt, entry["question"]), "question": entry["question"],
                   "answer": entry["answer"], "metadata": entry.get("metadata", {})}
            return entry["question"], row

        return sample_rows(self.name, split, n, seed, self.eval_fraction, make)

    def score(self, completion: Any, row: Mapping[str, Any]) -> float:
        """reasoning-gym's score in [0, 1] for the completion's answer (its <answer> tag, else its last line)."""
        text = completion_text(completion)
        answer = extract_answer(text)
        if answer is None:
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            answer = lines[-1] if lines else ""
        entry = {"question": row.get("question", ""), "answer": row["answer"], "metadata": row.get("metadata", {})}
        return float(self._scorer.score_answer(answer=answer, entry=entry))

    def check(self, completion: Any, row: Mapping[str, Any]) -> bool:
        return self.score(completion, row) >= 1.0

    def reward_funcs(self) -> list[RewardFunc]:
        return [_ScoreReward(self), format_reward]

    def reward_weights(self) -> list[float]:
        return [1.0, self.format_weight]


@dataclass(frozen=True)
class _ScoreReward:
    """reasoning-gym's (possibly partial) score as the reward."""

    task: ReasoningGymTask

    @property
    def __name__(self) -> str:  # type: ignore[override]
        return f"{self.task.dataset}_score"

    def __call__(self, prompts: Any, completions: Any, completion_ids: Any = None, *, answer: Any = None,
                 question: Any = None, metadata: Any = None, **columns: Any) -> list[float | None]:
        if answer is None or metadata is None:
            raise ThriftyError(f"{self.task.name} rewards need the `answer` and `metadata` columns of its rows.")
        questions = question if question is not None else [""] * len(completions)
        return [self.task.score(c, {"question": q, "answer": a, "metadata": m})
                for c, q, a, m in zip(completions, questions, answer, metadata)]

"""Held-out evaluation counts what it should: accuracy equals a hand-counted value on a
fixed set that crosses the generation-batch boundary, each completion is scored against
its own row, and results computed on shares of the rows (torchrun's ranks) merge into
the result on all of them."""

from __future__ import annotations

from typing import Any, Mapping

import pytest

from thrifty.formats.loader import load_model
from thrifty.generation.engine import generate_tokens, render_prompt
from thrifty.generation.sampling import SamplingParams
from thrifty.grpo.evaluation import EVAL_BATCH_PROMPTS, evaluate_rows, merge_eval_results

from tiny_tokenizer import save_tiny_model_dir

WORDS = ["red", "blue", "green", "one", "two", "three", "sun", "moon", "stone", "river"]


class ListedAnswers:
    """A task whose checker accepts the rows marked `accept` and records what it was
    shown, so the test can see which completion met which row."""

    name = "listed"

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}

    def check(self, completion: Any, row: Mapping[str, Any]) -> bool:
        self.seen[row["id"]] = completion
        return row["accept"]

    def follows_format(self, completion: str) -> bool:
        return True


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("tiny-llama-eval")
    save_tiny_model_dir("llama", directory)
    return load_model(directory, dtype="float32", device="cpu")


def fixed_rows(n: int) -> list[dict]:
    # Every third row and row 35 accepted: 13 + 1 = 14 of 37, counted by hand.
    return [{"id": i, "prompt": f"say {WORDS[i % 10]} {WORDS[(3 * i) % 10]} {i}", "accept": i % 3 == 0 or i == 35}
            for i in range(n)]


def test_accuracy_is_the_hand_counted_share_and_completions_meet_their_rows(tiny) -> None:
    model, tokenizer = tiny
    rows = fixed_rows(37)
    assert len(rows) > EVAL_BATCH_PROMPTS  # two generation batches
    task = ListedAnswers()
    result = evaluate_rows(model, tokenizer, task, rows, max_new_tokens=6)
    assert result.num_problems == 37 and result.accuracy == 14 / 37 and result.format_rate == 1.0
    # Each row was scored with the completion of its own prompt (generated alone here).
    for i in (0, 31, 32, 36):
        ids = render_prompt(tokenizer, rows[i]["prompt"], tokenizer.chat_template is not None, None)
        (alone,), _ = generate_tokens(model, [ids], max_new_tokens=6, sampling=SamplingParams(),
                                      stop_token_ids=tokenizer.stop_token_ids, pad_token_id=tokenizer.pad_token_id)
        assert task.seen[i] == tokenizer.decode(alone, skip_special_tokens=True)


def test_shares_merge_into_the_whole(tiny) -> None:
    model, tokenizer = tiny
    rows = fixed_rows(37)
    whole = evaluate_rows(model, tokenizer, ListedAnswers(), rows, max_new_tokens=6)
    parts = [evaluate_rows(model, tokenizer, ListedAnswers(), share, max_new_tokens=6)
             for share in (rows[:19], rows[19:])]
    merged = merge_eval_results(parts)
    assert merged.num_problems == 37 and merged.accuracy == pytest.approx(14 / 37)
    assert merged.mean_length == pytest.approx(whole.mean_length)
    assert merged.format_rate == 1.0 and len(merged.examples) == len(whole.examples)

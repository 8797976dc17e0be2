"""The SFT trainer's view of the data: train items, eval examples, held-out prompts, batches.

Train items are tokenized examples, or, with packing, packed sequences of several
examples. Either way a DataOrder over the items picks each micro-batch, and
`make_batch` turns the chosen items into the tensors the model eats.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np
import torch

from thrifty.errors import ThriftyError
from thrifty.model.tokenizer import Tokenizer
from thrifty.sft.batches import PackedBatch, collate_padded, pack_examples
from thrifty.sft.config import FORMATS, SFTConfig
from thrifty.sft.examples import IGNORE_INDEX, TokenizedExample, detect_format, tokenize_dataset
from thrifty.training.rows import Rows, load_rows

# What SFTTrainer accepts as a data set: a file path, rows (dicts), or examples it
# has already tokenized.
DatasetLike = Union[str, Path, Iterable[dict[str, Any]], Sequence[TokenizedExample]]
Prompt = Union[str, list[dict[str, Any]]]


@dataclass
class Batch:
    tensors: dict[str, torch.Tensor]  # input_ids, labels (shifted), positions; mask when packed
    num_tokens: int  # real (non-padding) input tokens, for throughput
    num_labels: int  # tokens with a loss, for the token-weighted mean


@dataclass
class SFTData:
    train_items: list[TokenizedExample] | list[PackedBatch]
    eval_examples: list[TokenizedExample]
    held_out_prompts: list[Prompt]  # prompts of eval rows, for before/after samples
    packed: bool
    pad_token_id: int

    def train_batch(self, indices: Sequence[int]) -> Batch:
        return make_batch([self.train_items[i] for i in indices], self.pad_token_id)

    def eval_batches(self, batch_size: int) -> Iterable[Batch]:
        for start in range(0, len(self.eval_examples), batch_size):
            yield make_batch(self.eval_examples[start:start + batch_size], self.pad_token_id)


def load_sft_data(config: SFTConfig, tokenizer: Tokenizer, train_dataset: DatasetLike | None,
                  eval_dataset: DatasetLike | None, sliding_window: int | None) -> SFTData:
    """Read, split, tokenize and (optionally) pack the train and eval data."""
    train_source = train_dataset if train_dataset is not None else config.train_file
    if train_source is None:
        raise ThriftyError("no training data: set train_file in the config (a .jsonl, .json, .csv or .parquet "
                           "file), or pass train_dataset to SFTTrainer.")
    eval_source = eval_dataset if eval_dataset is not None else config.eval_file
    train_rows, train_examples = _rows_or_examples(train_source, config.dataset_text_field)
    eval_rows, eval_examples = ((None, None) if eval_source is None
                                else _rows_or_examples(eval_source, config.dataset_text_field))
    if config.eval_split > 0 and eval_source is None:
        if train_rows is None:
            raise ThriftyError("eval_split needs rows or a file as train data, not pre-tokenized examples; "
                               "pass eval_dataset instead.")
        train_rows, eval_rows = split_rows(train_rows, config.eval_split, config.seed)

    def tokenize(rows: Rows) -> list[TokenizedExample]:
        return tokenize_dataset(rows, tokenizer, max_length=config.max_length, format=config.format,
                                completion_only_loss=config.completion_only_loss, truncation=config.truncation)

    if train_examples is None:
        train_examples = tokenize(train_rows)
    if eval_examples is None and eval_rows is not None:
        eval_examples = tokenize(eval_rows)
    if not any(label != IGNORE_INDEX for e in train_examples for label in e.labels[1:]):
        raise ThriftyError("no training example has a token to learn from (every label is masked); check "
                           "completion_only_loss and that completions survive max_length.")
    items: list[Any] = train_examples
    if config.packing:
        # Shuffle before packing so each packed sequence mixes examples from across the
        # file; the DataOrder over packed sequences then reshuffles them every epoch.
        shuffled = np.random.default_rng([config.seed, 0x9ac]).permutation(len(train_examples))
        items = pack_examples([train_examples[i] for i in shuffled], config.max_length,
                              sliding_window=sliding_window)
    chat = tokenizer.chat_template is not None
    prompts: list[Prompt] = list(config.sample_prompts)
    if not prompts and eval_rows is not None:
        prompts = held_out_prompts(eval_rows, config.format, config.num_sample_prompts, chat)
    return SFTData(items, eval_examples or [], prompts, config.packing, tokenizer.pad_token_id)


def _rows_or_examples(source: DatasetLike, text_field: str = "text",
                      ) -> tuple[Rows | None, list[TokenizedExample] | None]:
    if isinstance(source, (str, Path)):
        return _text_from(load_rows(source), text_field), None
    items = list(source)
    if items and all(isinstance(e, TokenizedExample) for e in items):
        return None, items
    return _text_from(load_rows(items), text_field), None


def _text_from(rows: Rows, text_field: str) -> Rows:
    """TRL's dataset_text_field: that column is the text format's `text`."""
    if text_field == "text":
        return rows
    renamed = [{**row, "text": row[text_field]} if text_field in row and "text" not in row else row for row in rows]
    return Rows(renamed, rows.locations, rows.source)


def split_rows(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """Hold out round(fraction * len) rows (at least 1, leaving at least 1), chosen by a
    seeded shuffle; both parts keep file order and their file/line locations."""
    n = len(rows)
    n_eval = max(1, round(fraction * n))
    if n_eval >= n:
        raise ThriftyError(f"eval_split={fraction} would hold out all {n} rows; lower it or add data.")
    chosen = set(np.random.default_rng([seed, 0xe7a1]).permutation(n)[:n_eval].tolist())
    locations = getattr(rows, "locations", [f"rows[{i}]" for i in range(n)])
    source = getattr(rows, "source", "rows")

    def part(keep: bool) -> Rows:
        index = [i for i in range(n) if (i in chosen) == keep]
        return Rows([rows[i] for i in index], [locations[i] for i in index], source)

    return part(False), part(True)


def held_out_prompts(rows: Sequence[dict[str, Any]], format: str | None, limit: int, chat: bool) -> list[Prompt]:
    """The prompt part of the first `limit` rows that have one (not plain-text rows)."""
    prompts: list[Prompt] = []
    for row in rows:
        if len(prompts) >= limit:
            break
        try:
            fmt = format or detect_format(row)
        except ThriftyError:
            continue
        prompt = _prompt_of(row, fmt)
        if prompt is None or (not chat and not isinstance(prompt, str)):
            continue
        prompts.append(prompt)
    return prompts


def _prompt_of(row: dict[str, Any], fmt: str) -> Prompt | None:
    if fmt not in FORMATS or fmt == "text":
        return None
    if fmt == "prompt_completion":
        prompt = row.get("prompt")
        return prompt if isinstance(prompt, (str, list)) and prompt else None
    if fmt == "alpaca":
        instruction, extra = row.get("instruction"), row.get("input")
        if instruction is None:  # input + output rows: the input is the prompt
            instruction, extra = extra, None
        if not isinstance(instruction, str):
            return None
        return f"{instruction}\n\n{extra}" if extra else instruction
    messages = row.get("messages")
    if not isinstance(messages, list):
        return None
    # Everything before the last assistant reply: the conversation the model answers.
    replies = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    if not replies or replies[-1] == 0:
        return None
    return messages[:replies[-1]]


def make_batch(items: Sequence[TokenizedExample] | Sequence[PackedBatch], pad_token_id: int) -> Batch:
    """Tensors for one micro-batch: right-padded examples, or packed sequences stacked
    into rows (each row keeps its own block-diagonal mask; rows are right-padded)."""
    if items and isinstance(items[0], PackedBatch):
        tensors = stack_packed(items, pad_token_id)  # type: ignore[arg-type]
        num_tokens = sum(sum(p.lengths) for p in items)  # type: ignore[union-attr]
    else:
        # Right padding: every key a real token may see is real, so plain causal attention
        # (the model's own, sliding window included) gives the same result for every token
        # the loss counts. SDPA's is_causal path skips the mask: ~30% less attention time.
        tensors = collate_padded(items, pad_token_id, with_mask=False)  # type: ignore[arg-type]
        num_tokens = sum(len(e) for e in items)  # type: ignore[arg-type]
    num_labels = int((tensors["labels"] != IGNORE_INDEX).sum())
    return Batch(tensors, num_tokens, num_labels)


def stack_packed(packed: Sequence[PackedBatch], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Several packed sequences as one [B, T] batch. Rows are padded on the right; a
    padding query sees only itself (SDPA would give NaN for a query that sees nothing)."""
    width = max(p.input_ids.shape[1] for p in packed)
    batch = len(packed)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.eye(width, dtype=torch.bool).repeat(batch, 1, 1, 1)
    for b, p in enumerate(packed):
        n = p.input_ids.shape[1]
        input_ids[b, :n] = p.input_ids[0]
        labels[b, :n] = p.labels[0]
        positions[b, :n] = p.positions[0]
        mask[b, 0, :n, :n] = p.mask[0, 0]
    return {"input_ids": input_ids, "labels": labels, "positions": positions, "mask": mask}

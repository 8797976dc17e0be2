"""Training data: files -> rows -> token ids with loss labels -> shuffled batches.

1. `load_rows` reads JSONL, JSON, CSV/TSV, Parquet or an in-memory list into row dicts
   that remember where they came from, so later errors can say "train.jsonl line 7".
2. `tokenize_example` / `tokenize_dataset` turn a row into input_ids and labels, in one
   of four formats told apart by their columns: `text`; `prompt` + `completion`; chat
   `messages`; Alpaca `instruction` (+ `input`) + `output`. Chat-shaped rows go through the
   model's chat template; labels are -100 wherever there is no loss.
3. `DataOrder` decides which examples make each batch: a seeded shuffle per epoch that a
   resumed run reproduces exactly from (seed, epoch, position).
4. `collate_padded` (right padding) and `pack_examples` (padding-free packing with a
   block-diagonal causal mask) build the tensors the trainer feeds to the model.

Labels: in a `TokenizedExample` they are aligned with input_ids, as in Hugging Face
(labels[i] is input_ids[i] or -100). In batches they come *shifted*: batch["labels"][b, t]
is the token position t must predict, so the loss is simply
`chunked_cross_entropy(hidden.flatten(0, 1), lm_head.weight, labels.flatten())`, and the
last token of a packed example never "predicts" the first token of the next one.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch

from thrifty.errors import ThriftyError
from thrifty.model.tokenizer import Tokenizer

IGNORE_INDEX = -100

Format = Literal["text", "prompt_completion", "messages", "alpaca"]
FORMATS: tuple[str, ...] = ("text", "prompt_completion", "messages", "alpaca")
Truncation = Literal["error", "truncate", "drop"]

# ---------------------------------------------------------------- loading rows


class Rows(list):
    """A list of row dicts that also remembers where each row came from
    (`locations[i]`, e.g. "data/train.jsonl line 7"), for error messages."""

    def __init__(self, rows: Iterable[dict[str, Any]], locations: list[str], source: str) -> None:
        super().__init__(rows)
        self.locations = locations
        self.source = source


def row_location(rows: Sequence[dict[str, Any]], index: int) -> str:
    """Where row `index` came from: its file and line for loaded rows, else rows[index]."""
    locations = getattr(rows, "locations", None)
    if locations is not None and len(locations) == len(rows):
        return locations[index]
    return f"rows[{index}]"


def load_rows(source: str | Path | Iterable[dict[str, Any]]) -> Rows:
    """Rows from a .jsonl/.ndjson, .json (a list of objects or {"data": [...]}), .csv/.tsv
    or .parquet file, or from an in-memory list of dicts (or any iterable of them, such
    as a `datasets.Dataset`). Raises ThriftyError naming the file and line of bad input."""
    if isinstance(source, (str, Path)):
        return _load_file(Path(source))
    rows = list(source)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ThriftyError(f"rows[{i}]: expected a dict of columns, got {type(row).__name__}.")
    if not rows:
        raise ThriftyError("the data set is empty: pass at least one row.")
    return Rows(rows, [f"rows[{i}]" for i in range(len(rows))], "rows")


def _load_file(path: Path) -> Rows:
    if not path.exists():
        raise ThriftyError(f"{path}: data file not found.")
    if path.is_dir():
        raise ThriftyError(f"{path}: is a directory; pass a .jsonl, .json, .csv, .tsv or .parquet file.")
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
               ".tsv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ThriftyError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv, .tsv or "
                           ".parquet (or pass a list of dicts).")
    try:
        rows, locations = reader(path)
    except UnicodeDecodeError as e:
        raise ThriftyError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); save the file as UTF-8.") from e
    if not rows:
        raise ThriftyError(f"{path}: the file holds no examples; add at least one row.")
    return Rows(rows, locations, str(path))


def _json_type(value: Any) -> str:
    names = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows, locations = [], []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines (often a trailing one) are not rows
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ThriftyError(f"{path}: line {n}: malformed JSON ({e.msg} at column {e.colno}). Each line "
                                   'must hold one complete JSON object, e.g. {"text": "..."}.') from e
            if not isinstance(row, dict):
                raise ThriftyError(f'{path}: line {n}: expected a JSON object like {{"text": "..."}}, '
                                   f"got {_json_type(row)}.")
            rows.append(row)
            locations.append(f"{path} line {n}")
    return rows, locations


def _read_json(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line in a .json file: really JSONL
            return _read_jsonl(path)
        raise ThriftyError(f"{path}: line {e.lineno} column {e.colno}: malformed JSON ({e.msg}).") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        found = f"an object with keys {sorted(data)}" if isinstance(data, dict) else _json_type(data)
        raise ThriftyError(f'{path}: expected a JSON list of objects, or an object with a "data" list; '
                           f"got {found}.")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise ThriftyError(f"{path}: row {i + 1}: expected a JSON object, got {_json_type(row)}.")
    return data, [f"{path} row {i + 1}" for i in range(len(data))]


def _read_csv(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows, locations = [], []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        try:
            header = next(reader, None)
            if header is None:
                return [], []
            duplicates = sorted({h for h in header if header.count(h) > 1})
            if duplicates:
                raise ThriftyError(f"{path}: line 1: the header repeats column(s) {duplicates}; name each once.")
            line = reader.line_num
            for fields in reader:
                start, line = line + 1, reader.line_num  # a quoted field may span several lines
                if not fields:
                    continue
                where = f"{path} row {len(rows) + 1} (line {start})"
                if len(fields) != len(header):
                    raise ThriftyError(f"{where}: {len(fields)} fields, but the header has {len(header)} "
                                       f"({', '.join(header)}). Quote fields that contain the delimiter.")
                rows.append(dict(zip(header, fields)))
                locations.append(where)
        except csv.Error as e:
            raise ThriftyError(f"{path}: line {reader.line_num}: malformed CSV ({e}).") from e
    return rows, locations


def _read_parquet(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ThriftyError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow.") from e
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError family for bad files
        raise ThriftyError(f"{path}: could not be read as Parquet ({e}). Is the file complete?") from e
    return rows, [f"{path} row {i + 1}" for i in range(len(rows))]


# ---------------------------------------------------------------- formats

_NEEDS = {"text": "'text'", "prompt_completion": "'prompt' and 'completion'", "messages": "'messages'",
          "alpaca": "'instruction' and 'output' (and optionally 'input')"}


def detect_format(row: dict[str, Any], where: str = "row") -> Format:
    """The format a row's columns imply; the first match of messages, prompt/completion,
    Alpaca, text (so extra columns such as an 'answer' for rewards do no harm)."""
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise ThriftyError(
        f"{where}: cannot tell the data format from the columns {sorted(keys)}. Provide 'text'; or 'prompt' + "
        "'completion'; or 'messages' (a list of {role, content}); or Alpaca 'instruction' (+ 'input') + 'output'. "
        "Rename the columns, or set format to one of " + ", ".join(FORMATS) + "."
    )


def _text_field(row: dict[str, Any], name: str, fmt: str, where: str, optional: bool = False) -> str | None:
    value = row.get(name)
    if value is None:
        if optional:
            return None
        raise ThriftyError(f"{where}: missing field '{name}' (the {fmt} format needs {_NEEDS[fmt]}).")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. "completion": 84 in an arithmetic data set
    if not isinstance(value, str):
        raise ThriftyError(f"{where}: field '{name}' must be a string, got {_json_type(value)}.")
    return value


def _messages_field(value: Any, name: str, where: str) -> list[dict[str, Any]]:
    """A list of {role, content} dicts; CSV cells hold it as a JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ThriftyError(f"{where}: field '{name}' is a string that is not a JSON list of messages "
                               f"({e.msg}).") from e
    if not isinstance(value, list) or not value:
        raise ThriftyError(f"{where}: field '{name}' must be a non-empty list of {{\"role\", \"content\"}} "
                           f"messages, got {_json_type(value) if value != [] else 'an empty list'}.")
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise ThriftyError(f"{where}: {name}[{j}] must be an object with 'role' and 'content', "
                               f"got {_json_type(m)}.")
        if not isinstance(m.get("role"), str):
            raise ThriftyError(f"{where}: {name}[{j}] has no 'role' (e.g. \"user\", \"assistant\", \"system\").")
        if m.get("content") is None and "tool_calls" not in m:
            raise ThriftyError(f"{where}: {name}[{j}] (role {m['role']!r}) has no 'content'.")
    return value


# ---------------------------------------------------------------- tokenizing


@dataclass
class TokenizedExample:
    """One training sequence. labels[i] is input_ids[i] where the model is trained to
    produce that token, IGNORE_INDEX (-100) where it is not (unshifted, as in HF)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_example(
    row: dict[str, Any],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    format: Format | None = None,
    completion_only_loss: bool = True,
    truncation: Literal["error", "truncate"] = "error",
    where: str = "row",
) -> TokenizedExample:
    """Token ids and labels for one row (`where` names it in errors).

    text: BOS (if the tokenizer adds one) + text + EOS, loss on every token.
    prompt/completion, Alpaca: a user turn and an assistant turn rendered with the chat
    template (Alpaca's user turn is instruction + "\\n\\n" + input); prompt and completion
    may also be lists of messages (TRL's conversational form). Without a chat template,
    prompt + completion + EOS are concatenated.
    messages: the whole conversation through the chat template.
    completion_only_loss: loss only on assistant turns (and the completion), each including
    its end-of-turn token so the model learns to stop; False trains on every token.
    A sequence longer than max_length raises, or is cut to max_length with truncation="truncate".
    """
    return _fit(_tokenize(row, tokenizer, format, completion_only_loss, where), max_length, truncation, where)


def _tokenize(row: dict[str, Any], tokenizer: Tokenizer, format: Format | None, completion_only_loss: bool,
              where: str) -> TokenizedExample:
    fmt = format or detect_format(row, where)
    if fmt not in FORMATS:
        raise ThriftyError(f"format {fmt!r} is not one of {', '.join(FORMATS)}.")
    if fmt == "text":
        ids = tokenizer.encode(_text_field(row, "text", fmt, where), add_special_tokens=True)  # type: ignore[arg-type]
        if not ids or ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)  # so the model learns where a document ends
        return TokenizedExample(ids, list(ids))
    messages, first_trainable = _as_conversation(row, fmt, where)
    if tokenizer.chat_template is None and fmt != "messages" and _is_plain_pair(messages):
        example = _plain_pair(messages[0]["content"], messages[1]["content"], tokenizer)
    else:
        example = _encode_segments(_chat_segments(messages, first_trainable, tokenizer, where), tokenizer)
    if not completion_only_loss:
        example.labels = list(example.input_ids)
    return example


def tokenize_dataset(
    rows: Sequence[dict[str, Any]],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    format: Format | None = None,
    completion_only_loss: bool = True,
    truncation: Truncation = "error",
) -> list[TokenizedExample]:
    """tokenize_example over every row. The format is detected from the first row unless
    given. truncation="drop" skips rows longer than max_length (with a warning)."""
    if truncation not in ("error", "truncate", "drop"):
        raise ThriftyError(f"truncation must be 'error', 'truncate' or 'drop', got {truncation!r}.")
    if not rows:
        raise ThriftyError("the data set is empty: nothing to tokenize.")
    fmt = format or detect_format(rows[0], row_location(rows, 0))
    examples, dropped, unlabelled = [], 0, 0
    for i, row in enumerate(rows):
        where = row_location(rows, i)
        example = _tokenize(row, tokenizer, fmt, completion_only_loss, where)
        if len(example) > max_length and truncation == "drop":
            dropped += 1
            continue
        example = _fit(example, max_length, truncation, where)
        if all(label == IGNORE_INDEX for label in example.labels[1:]):
            unlabelled += 1
        examples.append(example)
    if dropped:
        warnings.warn(f"skipped {dropped} of {len(rows)} examples longer than max_length={max_length} tokens.",
                      stacklevel=2)
    if not examples:
        raise ThriftyError(f"every example is longer than max_length={max_length} tokens; raise max_length.")
    if unlabelled:
        warnings.warn(f"{unlabelled} of {len(examples)} examples have no tokens to learn from (the completion was "
                      f"truncated away?); raise max_length to keep them useful.", stacklevel=2)
    return examples


def _as_conversation(row: dict[str, Any], fmt: str, where: str) -> tuple[list[dict[str, Any]], int]:
    """The row as chat messages, and the index of the first message that may be trained
    on: every assistant turn of a chat, only the completion of a prompt/completion pair."""
    if fmt == "messages":
        if row.get("messages") is None:
            raise ThriftyError(f"{where}: missing field 'messages' (the messages format needs {_NEEDS[fmt]}).")
        return _messages_field(row["messages"], "messages", where), 0
    if fmt == "alpaca":
        instruction = _text_field(row, "instruction", fmt, where)
        extra = _text_field(row, "input", fmt, where, optional=True)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        output = _text_field(row, "output", fmt, where)
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}], 1
    pair = []
    for name, role in (("prompt", "user"), ("completion", "assistant")):
        value = row.get(name)
        if isinstance(value, list):
            pair.append(_messages_field(value, name, where))
        else:
            pair.append([{"role": role, "content": _text_field(row, name, fmt, where)}])
    return pair[0] + pair[1], len(pair[0])


def _is_plain_pair(messages: list[dict[str, Any]]) -> bool:
    return [m["role"] for m in messages] == ["user", "assistant"]


def _plain_pair(prompt: str, completion: str, tokenizer: Tokenizer) -> TokenizedExample:
    """A base model without a chat template: prompt then completion + EOS, tokenized apart
    so the prompt's tokens are exactly those the model will see at generation time."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    if prompt_ids and prompt_ids[-1] == tokenizer.eos_token_id and tokenizer.add_eos_token:
        prompt_ids.pop()
    completion_ids = tokenizer.encode(completion) + [tokenizer.eos_token_id]
    return TokenizedExample(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids)


def _render(tokenizer: Tokenizer, messages: list[dict[str, Any]], generation_prompt: bool) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    except ThriftyError:
        return None  # e.g. a template that rejects an empty or user-less prefix


def _chat_segments(messages: list[dict[str, Any]], first_trainable: int, tokenizer: Tokenizer,
                   where: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces; trained pieces are the
    assistant turns at or after `first_trainable`, from after the turn's header (what the
    generation prompt adds) to the end of its rendering.

    Each turn's span comes from rendering the conversation incrementally, so no
    template-specific markers are parsed: the turn starts where render(messages[:i],
    add_generation_prompt=True) ends and ends where render(messages[:i+1]) ends. Templates
    whose earlier turns change once later ones follow (Qwen3 drops old reasoning) fail that
    prefix test; then the message content is located in the full rendering instead."""
    try:
        full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    except ThriftyError as e:
        raise ThriftyError(f"{where}: {e}") from e
    stop_strings = [s for s in (tokenizer.id_to_token(i) for i in tokenizer.stop_token_ids) if s]
    segments: list[tuple[str, bool]] = []
    cursor = 0
    trainable = [i for i, m in enumerate(messages) if i >= first_trainable and m["role"] == "assistant"]
    if not trainable:
        raise ThriftyError(f"{where}: the conversation has no assistant message, so there is nothing to learn; "
                           "add the assistant's reply.")
    for i in trainable:
        head = _render(tokenizer, messages[:i], True) if i > 0 else None
        turn = _render(tokenizer, messages[: i + 1], False)
        if head is not None and turn is not None and turn.startswith(head) and full.startswith(turn) \
                and cursor <= len(head):
            start, end = len(head), len(turn)
        else:
            start, end = _find_turn(full, messages[i], cursor, stop_strings, where, i)
        segments += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    segments.append((full[cursor:], False))
    return [s for s in segments if s[0]]


def _find_turn(full: str, message: dict[str, Any], cursor: int, stop_strings: list[str], where: str,
               index: int) -> tuple[int, int]:
    content = message.get("content")
    start = full.find(content, cursor) if isinstance(content, str) and content else -1
    if start < 0:
        raise ThriftyError(f"{where}: cannot find assistant message {index} in the chat template's rendering of the "
                           "conversation, so its loss mask is unknown. Use a template that renders each "
                           "assistant message's content verbatim.")
    end = start + len(content)
    for stop in stop_strings:
        if full.startswith(stop, end):
            return start, end + len(stop)
    return start, end


def _encode_segments(segments: list[tuple[str, bool]], tokenizer: Tokenizer) -> TokenizedExample:
    """Tokenize piece by piece (no BOS/EOS: the template writes its own), as a generation
    prompt is tokenized apart from the reply. A trained piece is labelled up to and including
    its first end-of-turn token; what the template puts after it (ChatML's newline) is
    never generated, so it gets no loss."""
    stops = set(tokenizer.stop_token_ids)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        ids = tokenizer.encode(text)
        input_ids += ids
        if trained:
            cut = next((k + 1 for k, t in enumerate(ids) if t in stops), len(ids))
            labels += ids[:cut] + [IGNORE_INDEX] * (len(ids) - cut)
        else:
            labels += [IGNORE_INDEX] * len(ids)
    return TokenizedExample(input_ids, labels)


def _fit(example: TokenizedExample, max_length: int, truncation: str, where: str) -> TokenizedExample:
    if len(example) <= max_length:
        return example
    if truncation == "truncate":
        return TokenizedExample(example.input_ids[:max_length], example.labels[:max_length])
    if truncation != "error":
        raise ThriftyError(f"truncation must be 'error' or 'truncate', got {truncation!r}.")
    raise ThriftyError(
        f"{where}: the example is {len(example)} tokens long, more than max_length={max_length}. "
        f"Raise max_length (to at least {len(example)}), or set truncation='truncate' to cut long examples "
        "or truncation='drop' to skip them."
    )


# ---------------------------------------------------------------- data order


@dataclass
class DataOrder:
    """Which items (examples, or packed sequences) make each batch, epoch after epoch.

    Epoch e visits the items in a permutation drawn from (seed, e) alone, so the order
    is the same in every run, and a run resumed from `state_dict()` (epoch, position)
    sees exactly the batches it would have seen without stopping.

        order = DataOrder(len(examples), batch_size=8, seed=42)
        for epoch in range(3):
            for indices in order:   # the rest of the current epoch
                ...
    """

    num_items: int
    batch_size: int = 1
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    epoch: int = 0
    position: int = 0  # items of the current epoch already handed out

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ThriftyError("the data set is empty: nothing to iterate over.")
        if self.batch_size < 1:
            raise ThriftyError(f"batch_size must be at least 1, got {self.batch_size}.")
        if self.drop_last and self.batch_size > self.num_items:
            raise ThriftyError(f"batch_size={self.batch_size} is larger than the {self.num_items} examples and "
                               "drop_last is set, so no batch could be formed; lower batch_size.")
        self._cached: tuple[int, list[int]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_items, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def permutation(self, epoch: int) -> list[int]:
        """The visiting order of epoch `epoch`."""
        if self._cached is None or self._cached[0] != epoch:
            if self.shuffle:
                # SeedSequence mixes (seed, epoch) into independent streams, unlike seed + epoch.
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items).tolist()
            else:
                order = list(range(self.num_items))
            self._cached = (epoch, order)
        return self._cached[1]

    def _epoch_end(self) -> int:
        return self.batches_per_epoch * self.batch_size if self.drop_last else self.num_items

    def next_batch(self) -> list[int]:
        """The next batch of item indices, moving on to the next epoch when one runs out."""
        if self.position >= self._epoch_end():
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.permutation(self.epoch)[self.position: self.position + self.batch_size]
        self.position += len(batch)
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        """The remaining batches of the current epoch (all of the next one if it is done)."""
        if self.position >= self._epoch_end():
            self.epoch, self.position = self.epoch + 1, 0
        epoch = self.epoch
        while self.epoch == epoch and self.position < self._epoch_end():
            yield self.next_batch()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"num_items": self.num_items, "batch_size": self.batch_size, "seed": self.seed,
                "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("num_items", "batch_size", "seed"):
            if state[key] != getattr(self, key):
                raise ThriftyError(
                    f"the checkpoint's data order has {key}={state[key]}, but this run has {getattr(self, key)}; "
                    "resuming would not see the same data. Use the same data set and settings as the saved run."
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ---------------------------------------------------------------- batches


def shifted_labels(labels: Sequence[int]) -> list[int]:
    """Position t's target is token t+1; the last position predicts nothing."""
    return list(labels[1:]) + [IGNORE_INDEX]


def collate_padded(examples: Sequence[TokenizedExample], pad_token_id: int, *,
                   sliding_window: int | None = None, with_mask: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, labels (shifted, -100 on padding), positions [B, T]
    and (with_mask) a boolean attention mask [B, 1, T, T] (True = may attend): causal,
    padding keys hidden. Pass the model's config.sliding_window, since an explicit mask
    replaces the model's own."""
    if not examples:
        raise ValueError("collate_padded needs at least one example.")
    lengths = [len(e) for e in examples]
    if min(lengths) == 0:
        raise ThriftyError("an example has no tokens; remove empty rows from the data.")
    width = max(lengths)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        input_ids[b, : len(e)] = torch.tensor(e.input_ids)
        labels[b, : len(e)] = torch.tensor(shifted_labels(e.labels))
    positions = torch.arange(width).unsqueeze(0).expand(len(examples), -1).contiguous()
    if not with_mask:
        return {"input_ids": input_ids, "labels": labels, "positions": positions}
    key_is_real = positions < torch.tensor(lengths).unsqueeze(1)
    mask = _causal(width, sliding_window) & key_is_real[:, None, None, :]
    # A padding query may see no real key (with a sliding window): let it see itself, or
    # SDPA gives it NaN, which would leak into real rows through 0 * NaN in later layers.
    mask |= torch.eye(width, dtype=torch.bool)
    return {"input_ids": input_ids, "labels": labels, "positions": positions, "mask": mask}


@dataclass
class PackedBatch:
    """Several examples laid end to end in one row [1, T], T <= max_length, no padding.

    positions restart at 0 for each example and the mask is block-diagonal causal, so
    each example attends only to itself: the model computes exactly what it would on
    the examples one by one. labels are shifted, -100 on each example's last position.
    """

    input_ids: torch.Tensor  # [1, T]
    labels: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    mask: torch.Tensor  # [1, 1, T, T] bool
    lengths: list[int]  # of the packed examples, in order

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The same keys as collate_padded's batches."""
        return {"input_ids": self.input_ids, "labels": self.labels, "positions": self.positions, "mask": self.mask}


def pack_examples(examples: Sequence[TokenizedExample], max_length: int, *,
                  sliding_window: int | None = None) -> list[PackedBatch]:
    """Pack examples, in the given order, into sequences of at most max_length tokens
    (next-fit: a sequence is closed when the next example does not fit). Shuffle before
    packing (a DataOrder over the packed sequences then shuffles them between epochs).
    Pass the model's config.sliding_window, since an explicit mask replaces the model's own."""
    groups: list[list[TokenizedExample]] = []
    used = max_length  # forces a new group for the first example
    for i, e in enumerate(examples):
        if len(e) == 0:
            raise ThriftyError(f"example {i} has no tokens; remove empty rows from the data.")
        if len(e) > max_length:
            raise ThriftyError(f"example {i} has {len(e)} tokens, more than the packing length {max_length}; "
                               "tokenize with the same max_length (and truncation) as you pack with.")
        if used + len(e) > max_length:
            groups.append([])
            used = 0
        groups[-1].append(e)
        used += len(e)
    return [_pack(group, sliding_window) for group in groups]


def _pack(group: list[TokenizedExample], sliding_window: int | None) -> PackedBatch:
    lengths = [len(e) for e in group]
    input_ids = torch.tensor([t for e in group for t in e.input_ids]).unsqueeze(0)
    labels = torch.tensor([t for e in group for t in shifted_labels(e.labels)]).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    segment = torch.repeat_interleave(torch.arange(len(group)), torch.tensor(lengths))
    # Within an example positions are consecutive, so position distance is token distance.
    mask = (_causal(len(segment), sliding_window) & (segment[:, None] == segment[None, :]))[None, None]
    return PackedBatch(input_ids, labels, positions, mask, lengths)


def _causal(width: int, sliding_window: int | None) -> torch.Tensor:
    """[T, T]: query i may see key j if j <= i (and i - j < window). Token index, not
    position, decides: within one example they differ by a constant."""
    distance = torch.arange(width)[:, None] - torch.arange(width)[None, :]
    allowed = distance >= 0
    if sliding_window is not None:
        allowed &= distance < sliding_window
    return allowed

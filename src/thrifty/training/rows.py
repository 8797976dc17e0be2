"""Training rows: files -> row dicts that remember where they came from -> a seeded order.

`load_rows` reads JSONL, JSON, CSV/TSV, Parquet or an in-memory list into row dicts that
remember their file and line, so later errors can say "train.jsonl line 7". `DataOrder`
decides which items make each batch: a seeded shuffle per epoch that a resumed run
reproduces exactly from (seed, epoch, position). Shared by SFT and GRPO.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from thrifty.errors import ThriftyError

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


def json_type(value: Any) -> str:
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
                                   f"got {json_type(row)}.")
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
        found = f"an object with keys {sorted(data)}" if isinstance(data, dict) else json_type(data)
        raise ThriftyError(f'{path}: expected a JSON list of objects, or an object with a "data" list; '
                           f"got {found}.")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise ThriftyError(f"{path}: row {i + 1}: expected a JSON object, got {json_type(row)}.")
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


def is_blank(text: Any) -> bool:
    """Whether `text` is a string with nothing but whitespace (a missing or mistyped value
    is not blank: its own error names it)."""
    return isinstance(text, str) and not text.strip()


def without_blank_prompts(rows: Sequence[dict[str, Any]], where: str) -> Sequence[dict[str, Any]]:
    """GRPO's rows whose prompt says something: a blank prompt (or chat messages that are
    all blank) gives completions conditioned on nothing. Skipped with their count and lines; an
    error when none is left."""
    def blank(prompt: Any) -> bool:
        if isinstance(prompt, list):
            return all(isinstance(m, dict) and is_blank(m.get("content")) for m in prompt)
        return is_blank(prompt)

    empty = [i for i, row in enumerate(rows) if blank(row["prompt"])]
    if not empty:
        return rows
    places = [row_location(rows, i) for i in empty]
    what = f"{len(empty)} of {len(rows)} rows of {where} have an empty prompt"
    if len(empty) == len(rows):
        raise ThriftyError(f"{what}: nothing to train on ({', '.join(places[:5])}). Fill in the prompts.")
    warnings.warn(f"skipped {what}: {', '.join(places[:5])}{', ...' if len(places) > 5 else ''}.", stacklevel=3)
    skipped = set(empty)
    kept = [i for i in range(len(rows)) if i not in skipped]
    return Rows([rows[i] for i in kept], [row_location(rows, i) for i in kept], where)


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

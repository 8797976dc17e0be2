"""Opening a GGUF file and reading its metadata, with clear errors for damaged files."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from thrifty.errors import ThriftyError

_GGUF_MAGIC = b"GGUF"


class _FastGGUFReader(gguf.GGUFReader):
    """GGUFReader that parses metadata arrays several times faster; same fields, same tensors.

    The stock reader slices the file once per array element, and SmolLM2's vocabulary
    alone is ~150k elements (tokens, token types, merges). On an np.memmap every slice
    runs memmap's Python-level hooks: ~3.5 s of a default-model load on our CPU.
    Slicing a plain ndarray view of the same mapping, and cutting scalar arrays out
    of one read, brings it to a fraction of a second. Both overrides build exactly the
    parts/data layout the stock reader builds (tests compare them field by field).
    """

    def _get(self, *args: Any, **kwargs: Any) -> np.ndarray:
        if isinstance(self.data, np.memmap):
            # The view keeps the memmap (and so the mapping) alive through .base.
            self.data = self.data.view(np.ndarray)
        return super()._get(*args, **kwargs)

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list, list]:
        if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I" or sys.byteorder != "little":
            return super()._get_field_parts(orig_offs, raw_type)
        offs = orig_offs
        raw_itype = self._get(offs, np.uint32)
        alen = self._get(offs + 4, np.uint64)
        offs += 12
        itype = gguf.GGUFValueType(int(raw_itype[0]))
        count = int(alen[0])
        parts: list[np.ndarray] = [raw_itype, alen]
        types = [gguf.GGUFValueType.ARRAY] + ([itype] if count else [])
        data = self.data
        if itype == gguf.GGUFValueType.STRING:
            for _ in range(count):
                slen = data[offs:offs + 8].view(np.uint64)
                size = int(slen[0])
                text = data[offs + 8:offs + 8 + size]
                if len(text) != size:
                    raise ValueError("string runs past the end of the file")
                parts += (slen, text)
                offs += 8 + size
            return offs - orig_offs, parts, list(range(3, 3 + 2 * count, 2)), types
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is None:  # arrays of arrays: rare, let the stock reader walk them
            return super()._get_field_parts(orig_offs, raw_type)
        values = self._get(offs, nptype, count)
        if len(values) != count:
            raise ValueError("array runs past the end of the file")
        parts += [values[i:i + 1] for i in range(count)]
        return offs + int(values.nbytes) - orig_offs, parts, list(range(2, 2 + count)), types


def open_gguf(path: Path) -> gguf.GGUFReader:
    """A GGUFReader over `path`, or a ThriftyError saying what is wrong with the file."""
    path = Path(path)
    if not path.exists():
        raise ThriftyError(f"{path}: no such file. Pass a .gguf file, a Hugging Face model directory, "
                           "or 'smollm2-135m-instruct'.")
    if path.is_dir():
        raise ThriftyError(f"{path}: is a directory, not a GGUF file.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ThriftyError(
            f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF starts with b'GGUF'). "
            "Pass a .gguf file, or a Hugging Face model directory."
        )
    try:
        reader = _FastGGUFReader(path)
        _check_tensor_data(reader)
    except ThriftyError:
        raise
    except Exception as e:  # anything the parser trips on means a damaged file
        raise ThriftyError(
            f"{path}: the GGUF file is truncated or corrupt; download it again (an interrupted download "
            f"is the usual cause). File size: {path.stat().st_size} bytes; reader error: {type(e).__name__}: {e}"
        ) from e
    return reader


def _check_tensor_data(reader: gguf.GGUFReader) -> None:
    """Every tensor's bytes must be inside the file; a cut-off download fails here, not later."""
    size = len(reader.data)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ValueError(f"tensor {t.name!r} needs bytes {t.data_offset}..{t.data_offset + t.n_bytes} "
                             f"but the file has {size} bytes")


def metadata_value(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """One metadata value as a Python str/int/float/bool, or a list of them; `default` if absent."""
    field = reader.fields.get(key)
    if field is None or not field.types:
        return default
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        if not field.data:
            return []
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if field.types[-1] == gguf.GGUFValueType.ARRAY:
            raise ThriftyError(f"GGUF metadata {key!r}: nested arrays are not supported.")
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    if kind == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]][0].item()

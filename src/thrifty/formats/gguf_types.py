"""Which GGUF type each tensor gets, as llama-quantize chooses it, and its bytes.

A file type (`q4_k_m`, ...) names a default type and a mix: llama.cpp's
`llama_tensor_get_type` (llama-quant.cpp) gives the output head (or a tied embedding)
Q6_K, the value projection and the MLP's down projection of some layers Q6_K under the
`_m` mixes, and falls back to a legacy type for rows a K-quant block does not divide
(SmolLM2's 576-wide rows: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0). Only matrices
whose names end in `weight` are quantized; vectors (norms, biases) stay F32. The rules
here are the ones for dense models that are not Falcon or a 70B (the families Thrifty
writes), without an importance matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from thrifty.errors import ThriftyError
from thrifty.formats.gguf_kquants import quantize_q4_k, quantize_q5_k, quantize_q6_k

QType = gguf.GGMLQuantizationType
FileType = gguf.LlamaFileType


@dataclass(frozen=True)
class GGUFType:
    """A file type: its default tensor type and the file_type llama.cpp records for it."""

    default: QType
    file_type: FileType

    @property
    def quantized(self) -> bool:
        return self.default not in (QType.F32, QType.F16, QType.BF16)


TYPES = {
    "f32": GGUFType(QType.F32, FileType.ALL_F32),
    "f16": GGUFType(QType.F16, FileType.MOSTLY_F16),
    "bf16": GGUFType(QType.BF16, FileType.MOSTLY_BF16),
    "q8_0": GGUFType(QType.Q8_0, FileType.MOSTLY_Q8_0),
    "q4_0": GGUFType(QType.Q4_0, FileType.MOSTLY_Q4_0),
    "q4_k_m": GGUFType(QType.Q4_K, FileType.MOSTLY_Q4_K_M),
    "q5_k_m": GGUFType(QType.Q5_K, FileType.MOSTLY_Q5_K_M),
    "q6_k": GGUFType(QType.Q6_K, FileType.MOSTLY_Q6_K),
}
# The names Unsloth's save_pretrained_gguf takes for the same choices.
ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m"}

_FALLBACK = {QType.Q4_K: QType.Q5_0, QType.Q5_K: QType.Q5_1, QType.Q6_K: QType.Q8_0}
_K_QUANTIZERS = {QType.Q4_K: quantize_q4_k, QType.Q5_K: quantize_q5_k, QType.Q6_K: quantize_q6_k}


def file_type(name: str) -> GGUFType:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TYPES:
        raise ThriftyError(f"quantization {name!r} is not a GGUF type Thrifty writes; use one of "
                           f"{', '.join([*TYPES, *ALIASES])}.")
    return TYPES[key]


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_types(shapes: dict[str, tuple[int, ...]], kind: GGUFType, n_layers: int) -> dict[str, QType]:
    """The type of each tensor (GGUF name -> numpy shape [rows, columns], in the file's
    order: layer by layer). llama-quantize's per-kind counters, which decide the `_m`
    mixes' layers, count attn_v and ffn_down tensors in that order (checked against
    llama.cpp's own choices in tests/formats/test_gguf_llama_cpp.py)."""
    has_output = "output.weight" in shapes
    counters = {"attn_v": 0, "ffn_down": 0}
    types = {}
    for name in shapes:
        shape = shapes[name]
        if len(shape) < 2 or not name.endswith("weight") or name.endswith("_norm.weight"):
            types[name] = QType.F32
        elif not kind.quantized:
            types[name] = kind.default
        else:
            types[name] = _mixed_type(name, shape[-1], kind, counters, n_layers, has_output)
    return types


def _mixed_type(name: str, columns: int, kind: GGUFType, counters: dict[str, int], n_layers: int,
                has_output: bool) -> QType:
    new = kind.default
    mix = kind.file_type
    if name == "output.weight" or (not has_output and name == "token_embd.weight"):
        if columns % gguf.GGML_QUANT_SIZES[new][0]:
            new = QType.Q8_0
        elif new != QType.Q8_0:
            new = QType.Q6_K
    elif "attn_v.weight" in name:
        if mix in (FileType.MOSTLY_Q4_K_M, FileType.MOSTLY_Q5_K_M) and use_more_bits(counters["attn_v"], n_layers):
            new = QType.Q6_K
        counters["attn_v"] += 1
    elif "ffn_down" in name:
        if mix in (FileType.MOSTLY_Q4_K_M, FileType.MOSTLY_Q5_K_M) and use_more_bits(counters["ffn_down"], n_layers):
            new = QType.Q6_K
        counters["ffn_down"] += 1
    if columns % gguf.GGML_QUANT_SIZES[new][0]:
        if new not in _FALLBACK:
            raise ThriftyError(f"{name}: rows of {columns} values do not fill whole {new.name} blocks; llama.cpp "
                               "refuses this tensor too. Choose f16, bf16 or a K-quant type.")
        new = _FALLBACK[new]
        if columns % gguf.GGML_QUANT_SIZES[new][0]:
            new = QType.F16
    return new


def encode(array: np.ndarray, tensor_type: QType) -> np.ndarray:
    """The tensor's bytes (or values, for F32/F16) as the GGUF writer takes them."""
    if tensor_type == QType.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if tensor_type == QType.F16:
        return array.astype(np.float16)
    array = np.ascontiguousarray(array, dtype=np.float32)
    if tensor_type in _K_QUANTIZERS:
        return _K_QUANTIZERS[tensor_type](array)
    return gguf.quants.quantize(array, tensor_type)

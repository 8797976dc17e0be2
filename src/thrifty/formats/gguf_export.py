"""Write a model as a GGUF file that llama.cpp (and Ollama, LM Studio) run: no llama.cpp
build, no converter script, written by Thrifty in Python with the `gguf` package.

The file holds what `formats/gguf.py` reads back and llama.cpp's loader expects: the
architecture's hyper-parameters (`llama` for Llama and Mistral, `qwen2`, `qwen3`), the
tensors under llama.cpp's names with the q/k row permutation its `llama` architecture
expects, a Llama 3.1 rope_freqs tensor, the byte-level BPE tokenizer (tokens, types,
merges, the pre-tokenizer llama.cpp must use), the special token ids and the chat
template. Types: f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m and q6_k, each tensor given
the type llama-quantize gives it (formats/gguf_types.py), the K-quants quantized as its
reference quantizers do (formats/gguf_kquants.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from thrifty.errors import ThriftyError
from thrifty.formats.atomic import atomic_file, require_finite
from thrifty.formats.gguf import GLOBAL_NAMES, LAYER_NAMES, PERMUTED_ARCHITECTURES, SUPPORTED_ARCHITECTURES
from thrifty.formats.gguf_tokenizer import CONTROL, NORMAL, UNUSED, USER_DEFINED, pre_names, pre_tokenizer_for
from thrifty.formats.gguf_types import GGUFType, encode, file_type, tensor_types
from thrifty.formats.hf_export import hf_state_dict
from thrifty.model.config import smollm3_no_rope_layers
from thrifty.model.decoder import CausalLM, rope_inverse_frequencies
from thrifty.model.tokenizer import Tokenizer

QType = gguf.GGMLQuantizationType

_HF_TO_GGUF = {hf: gguf_name for gguf_name, hf in GLOBAL_NAMES.items()}
_HF_LAYER_TO_GGUF = {hf: gguf_name for gguf_name, hf in LAYER_NAMES.items()}


def export_gguf(model: CausalLM, tokenizer: Tokenizer, path: str | Path, quantization: str = "f16",
                name: str | None = None, progress: bool = False) -> Path:
    """Write `model` (plain: LoRA merged, not quantized) and `tokenizer` to the GGUF file
    `path`, which appears only when complete. Returns the path."""
    path = Path(path)
    kind = file_type(quantization)
    if path.suffix != ".gguf":
        raise ThriftyError(f"{path}: a GGUF file name ends in .gguf; choose e.g. {path.with_suffix('.gguf')}.")
    if path.is_dir():
        raise ThriftyError(f"{path} is a directory; give the path of the .gguf file to write.")
    config = model.config
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
            "smollm3": "smollm3"}.get(config.model_type)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ThriftyError(f"model_type {config.model_type!r} cannot be written as GGUF (supported: llama, mistral, "
                           "qwen2, qwen3, smollm3).")
    if arch == "smollm3" and config.no_rope_layers != smollm3_no_rope_layers(config.num_hidden_layers):
        raise ThriftyError("this SmolLM3 model's no_rope_layers are not every 4th layer, the only pattern "
                           "llama.cpp runs; it cannot be written as GGUF.")
    state = hf_state_dict(model)  # refuses LoRA layers and quantized ones
    require_finite(state, path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(temporary: str) -> None:
        # Streamed: tensor infos first, then one tensor at a time converted, encoded and
        # written, so the export needs the model plus one tensor, not a copy of the model.
        writer = gguf.GGUFWriter(temporary, arch)
        _add_model_metadata(writer, model, kind, name or path.stem)
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        sources = _tensor_sources(state, model, arch)
        types = tensor_types({name: shape for name, (shape, _) in sources.items()}, kind, config.num_hidden_layers)
        for gguf_name, (shape, _) in sources.items():
            writer.add_tensor_info(gguf_name, *_encoded_layout(shape, types[gguf_name]), raw_dtype=types[gguf_name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = tqdm(total=len(sources), desc="Writing", unit="tensor", disable=not progress)
        for gguf_name, (_, values) in sources.items():
            writer.write_tensor_data(encode(values(), types[gguf_name]))
            bar.update()
        bar.close()
        writer.close()

    atomic_file(path, write)
    return path


# ---------------------------------------------------------------- metadata


def _add_model_metadata(writer: gguf.GGUFWriter, model: CausalLM, kind: GGUFType, name: str) -> None:
    config = model.config
    writer.add_name(name)
    writer.add_file_type(kind.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_vocab_size(config.vocab_size)
    if config.sliding_window is not None and config.model_type == "mistral":
        writer.add_sliding_window(config.sliding_window)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        if "original_max_position_embeddings" in scaling:
            writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3"):  # llama3: the rope_freqs tensor (see _tensors)
        raise ThriftyError(f"rope_scaling {kind!r} cannot be written as GGUF.")


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ThriftyError(f"{tokenizer.source}: only byte-level BPE tokenizers (SmolLM, Qwen, Llama 3) are written "
                           "to GGUF yet; this one is a " + str(model.get("type")) + " tokenizer.")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # as convert_hf_to_gguf pads past the vocabulary
    types = [UNUSED] * vocab_size
    for token, index in model["vocab"].items():
        if index < vocab_size:
            tokens[index], types[index] = token, NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(tokenizer.add_bos_token)
    writer.add_add_eos_token(tokenizer.add_eos_token)
    end_of_turn = [i for i in tokenizer.stop_token_ids if i != tokenizer.eos_token_id]
    if end_of_turn:
        writer.add_eot_token_id(end_of_turn[0])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# Text whose pre-tokenization tells llama.cpp's pre-tokenizer types apart (digits in runs,
# contractions, case, punctuation runs, newlines and spaces).
_PROBE = "Hello World! It's 2024-12-05, we've got 1234567 apples.\n\n  Über\tcafé ... 'LL 3.14 x__y ()"


def _pre_name(tokenizer: Tokenizer) -> str:
    """The llama.cpp pre-tokenizer type that splits text as `tokenizer` does, found by
    splitting a probe text with each (convert_hf_to_gguf identifies it by a hash of
    token ids; the splits compare the same thing without a table of hashes)."""
    want = tokenizer.backend.pre_tokenizer.pre_tokenize_str(_PROBE) if tokenizer.backend.pre_tokenizer else None
    for name in pre_names():
        if pre_tokenizer_for(name, Path(tokenizer.source)).pre_tokenize_str(_PROBE) == want:
            return name
    raise ThriftyError(f"{tokenizer.source}: its pre-tokenizer splits text unlike any llama.cpp knows; it cannot be "
                       "written to GGUF faithfully.")


# ---------------------------------------------------------------- tensors


def _tensor_sources(state: dict[str, torch.Tensor], model: CausalLM,
                    arch: str) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    """Each tensor under llama.cpp's name: its shape, and a function making its float32
    values (q/k rows permuted for the `llama` architecture) when it is written."""
    config = model.config
    out: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]] = {}
    for hf_name, tensor in state.items():
        heads = None
        if arch in PERMUTED_ARCHITECTURES and hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight",
                                                                 "k_proj.bias")):
            heads = config.num_attention_heads if ".q_proj." in hf_name else config.num_key_value_heads
        out[_gguf_name(hf_name)] = (tuple(tensor.shape), partial(_float32_values, tensor, heads))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "llama3":
        plain = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim))
        factors = (plain / rope_inverse_frequencies(config).double().numpy()).astype(np.float32)
        out["rope_freqs.weight"] = (factors.shape, lambda: factors)
    return out


def _float32_values(tensor: torch.Tensor, permute_heads: int | None) -> np.ndarray:
    array = tensor.float().numpy()
    return array if permute_heads is None else _permute_rows(array, permute_heads)


def _encoded_layout(shape: tuple[int, ...], tensor_type: QType) -> tuple[tuple[int, ...], type, int]:
    """The shape, numpy dtype and byte count `encode` gives a tensor of `shape`, as the
    writer's tensor info wants them before the bytes exist."""
    if tensor_type in (QType.F32, QType.F16):
        dtype = np.float32 if tensor_type == QType.F32 else np.float16
        return shape, dtype, int(np.prod(shape)) * np.dtype(dtype).itemsize
    byte_shape = gguf.quant_shape_to_byte_shape(shape, tensor_type)
    return byte_shape, np.uint8, int(np.prod(byte_shape))


def _gguf_name(hf_name: str) -> str:
    if hf_name in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf_name]
    _, _, rest = hf_name.partition("model.layers.")
    index, _, part = rest.partition(".")
    if not index.isdigit() or part not in _HF_LAYER_TO_GGUF:
        raise ThriftyError(f"tensor {hf_name!r} has no GGUF name; this model cannot be written as GGUF.")
    return f"blk.{index}.{_HF_LAYER_TO_GGUF[part]}"


def _permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `llama` architecture applies RoPE to interleaved pairs; Hugging Face
    rotates halves. convert_hf_to_gguf permutes q/k rows so the two agree (the inverse of
    formats/gguf.py's _unpermute_rows)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- Ollama

# ChatML (SmolLM2, Qwen): Ollama's own template language for the same turns, so `ollama
# create` needs nothing from the GGUF's jinja template.
_CHATML_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def write_ollama_modelfile(gguf_path: Path, tokenizer: Tokenizer) -> Path:
    """A Modelfile beside `gguf_path`: FROM the file, the chat turns, the stop tokens and
    greedy-leaning sampling defaults. Returns its path."""
    lines = [f"FROM ./{gguf_path.name}", ""]
    if tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template:
        lines += [f'TEMPLATE """{_CHATML_TEMPLATE}"""', ""]
    else:
        lines += ["# No TEMPLATE: Ollama takes the chat template from the GGUF file's tokenizer.chat_template.", ""]
    for token_id in dict.fromkeys([tokenizer.eos_token_id, *tokenizer.stop_token_ids]):
        token = tokenizer.id_to_token(token_id)
        if token:
            lines.append(f'PARAMETER stop "{token}"')
    lines += ["PARAMETER temperature 0.2", "PARAMETER top_p 0.9", ""]
    path = gguf_path.with_name("Modelfile")
    atomic_file(path, lambda temporary: Path(temporary).write_text("\n".join(lines), encoding="utf-8"))
    return path

"""Load a llama.cpp GGUF file as float32 Hugging Face-named tensors, a ModelConfig and a Tokenizer.

GGUF stores the architecture as `{arch}.*` metadata keys, the tokenizer as
`tokenizer.ggml.*` keys and the weights in llama.cpp's names and (often quantized)
block formats. We dequantize with `gguf.quants` (vectorised numpy), rename to the
names transformers uses, and undo the one layout change llama.cpp's converter makes:
for the `llama` architecture it permutes the rows of q_proj/k_proj so that rotary
pairs are interleaved rather than split in halves.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from thrifty.errors import ThriftyError
from thrifty.formats.build import GGUFBlocks
from thrifty.formats.gguf_reader import metadata_value, open_gguf
from thrifty.formats.gguf_tokenizer import tokenizer_from_gguf
from thrifty.kernels.gguf_blocks import BLOCK_LAYOUTS
from thrifty.model.config import ModelConfig, gemma3_layer_types, smollm3_no_rope_layers
from thrifty.model.tokenizer import Tokenizer

# GGUF `general.architecture` values this loader maps onto our decoder.
# Mistral GGUFs are written with architecture "llama".
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "smollm3", "gemma3")
# Architectures whose converter permutes q/k rows (LlamaModel's permute in convert_hf_to_gguf).
PERMUTED_ARCHITECTURES = ("llama", "smollm3")

# llama.cpp tensor name -> Hugging Face name. "{i}" is the layer index.
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma 3's norms: llama.cpp's ffn_norm is the MLP's input norm, as Llama's
# post_attention_layernorm is; Gemma's post_attention_layernorm norms the attention's output.
GEMMA3_LAYER_NAMES = {
    **LAYER_NAMES,
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
# Tensors llama.cpp adds that carry no weights of their own: rope_freqs holds the
# per-frequency llama3 rope scaling factors, which we turn back into config.rope_scaling.
_DERIVED_TENSORS = ("rope_freqs.weight",)


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Read a GGUF file: (config, tensors with Hugging Face names, tokenizer).

    Each tensor is dequantized to float32 and converted to `dtype` before the next one
    is read, so loading in bf16 never holds the whole model in float32."""
    config, tokenizer, tensors = read_gguf(path)
    weights = dict(tensors.items(dtype))
    _check_complete(weights, config, Path(path))
    return config, weights, tokenizer


def read_gguf(path: Path) -> tuple[ModelConfig, Tokenizer, GGUFTensors]:
    """(config, tokenizer, the tensors to read on demand) of a GGUF file."""
    path = Path(path)
    reader = open_gguf(path)
    arch = metadata_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ThriftyError(
            f"{path}: GGUF architecture {arch!r} is not supported; Thrifty loads "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} GGUF files (Llama, SmolLM 1-3, Mistral, Qwen2/2.5, Qwen3, "
            "Gemma 3). "
            "Use a model of one of those families, or its Hugging Face directory."
        )
    tokenizer = tokenizer_from_gguf(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    config = _config_from_metadata(reader, arch, tensors, tokenizer, path)
    return config, tokenizer, GGUFTensors(tensors, config, arch, path)


class GGUFTensors:
    """A GGUF file's tensors under Hugging Face names, read one at a time."""

    def __init__(self, tensors: dict[str, Any], config: ModelConfig, arch: str, path: Path) -> None:
        self.tensors, self.config, self.arch, self.path = tensors, config, arch, path

    def items(self, dtype: torch.dtype, keep_blocks: bool = False) -> Iterator[tuple[str, torch.Tensor | GGUFBlocks]]:
        """(name, tensor) in file order: dequantized to `dtype`, or with keep_blocks, the
        matrices of the block types Thrifty's kernels read as GGUFBlocks over the file's
        own bytes (mapped, not copied; llama's q/k rows are reordered into a copy)."""
        for name, t in self.tensors.items():
            hf = _hf_name(name, self.arch)
            if hf is None:
                if name in _DERIVED_TENSORS:
                    continue
                raise ThriftyError(f"{self.path}: tensor {name!r} has no place in a {self.arch} decoder; "
                                   "this file is not a plain Llama/Qwen model and cannot be loaded.")
            heads = self._permuted_heads(name)
            if keep_blocks and int(t.tensor_type) in BLOCK_LAYOUTS and len(t.shape) == 2:
                blocks = np.asarray(t.data).reshape(int(t.shape[1]), -1)
                if heads:
                    blocks = _unpermute_rows(blocks, heads).copy()
                with warnings.catch_warnings():  # the mapping is read-only; the layers never write it
                    warnings.simplefilter("ignore", UserWarning)
                    tensor = torch.from_numpy(blocks)
                yield hf, GGUFBlocks(tensor, int(t.tensor_type), (int(t.shape[1]), int(t.shape[0])))
                continue
            try:
                w = gguf.quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError as e:
                raise ThriftyError(f"{self.path}: tensor {name!r} is stored as {t.tensor_type.name}, which the "
                                   f"installed gguf package cannot dequantize ({e}). Upgrade it (pip install -U "
                                   "gguf) or use a file quantized differently.") from e
            w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
            if heads:
                w = _unpermute_rows(w, heads)
            w = np.ascontiguousarray(w, dtype=np.float32)
            if self.arch == "gemma3" and name.endswith("norm.weight"):
                w = w - 1.0  # llama.cpp's converter stores Gemma's norms as the 1 + w they scale by
            if not w.flags.writeable:  # F32 tensors come straight from the read-only file mapping
                w = w.copy()
            yield hf, torch.from_numpy(w).to(dtype)

    def _permuted_heads(self, name: str) -> int:
        """llama's converter permutes the rows of q/k: the head count to undo it with, or 0."""
        if self.arch not in PERMUTED_ARCHITECTURES:
            return 0
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            return self.config.num_attention_heads
        if name.endswith(("attn_k.weight", "attn_k.bias")):
            return self.config.num_key_value_heads
        return 0


# ---------------------------------------------------------------- config


def _config_from_metadata(reader: gguf.GGUFReader, arch: str, tensors: dict[str, Any],
                          tokenizer: Tokenizer, path: Path) -> ModelConfig:
    def get(key: str, default: Any = None) -> Any:
        return metadata_value(reader, f"{arch}.{key}", default)

    def need(key: str) -> Any:
        value = get(key)
        if value is None:
            raise ThriftyError(f"{path}: GGUF metadata key '{arch}.{key}' is missing; the file is incomplete. "
                               "Re-convert or re-download it.")
        return value

    if "token_embd.weight" not in tensors:
        raise ThriftyError(f"{path}: no 'token_embd.weight' tensor; the file is incomplete. Re-download it.")
    hidden = need("embedding_length")
    heads = need("attention.head_count")
    kv_heads = get("attention.head_count_kv") or heads
    head_dim = get("attention.key_length") or hidden // heads
    rope_dim = get("rope.dimension_count")
    if rope_dim is not None and rope_dim != head_dim:
        raise ThriftyError(f"{path}: '{arch}.rope.dimension_count' = {rope_dim} but heads are {head_dim} wide; "
                           "partial rotary embeddings are not supported.")
    # The embedding matrix decides vocab_size: '{arch}.vocab_size' is often absent, and the
    # token list (which converters pad to the embedding size) is only a proxy for it.
    vocab_size = int(tensors["token_embd.weight"].shape[-1])
    sliding = get("attention.sliding_window")
    model_type = arch
    if arch == "llama" and sliding:
        model_type = "mistral"  # Mistral GGUFs say "llama"; the window is what tells them apart
    if arch in ("qwen2", "qwen3"):
        sliding = None  # Qwen checkpoints carry a window they do not use (use_sliding_window=false)
    theta = float(get("rope.freq_base", 10000.0))
    family: dict[str, Any] = {}  # the fields of one family
    if arch == "gemma3":
        family = _gemma3_fields(get, need("block_count"), hidden, heads, head_dim, sliding)
        model_type, sliding = "gemma3_text", None
    if arch == "smollm3":  # llama.cpp's: no RoPE in every 4th layer (no metadata key says so)
        family = {"no_rope_layers": smollm3_no_rope_layers(need("block_count"))}
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length"),
        num_hidden_layers=need("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(reader, arch, tensors, theta, head_dim, path),
        max_position_embeddings=get("context_length", 4096),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        sliding_window=sliding or None,
        model_type=model_type,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=list(tokenizer.stop_token_ids),
        pad_token_id=metadata_value(reader, "tokenizer.ggml.padding_token_id"),
        **family,
    )


def _gemma3_fields(get: Any, layers: int, hidden: int, heads: int, head_dim: int,
                   window: int | None) -> dict[str, Any]:
    """What llama.cpp's gemma3 loader knows without metadata: every 6th layer global, the
    others local with RoPE base 10k; scores scaled by head_dim^-1/2 except in the 27B
    model (62 layers: hidden / heads)."""
    return dict(
        hidden_act="gelu_pytorch_tanh",
        gemma_norms=True,
        embedding_scale=float(hidden) ** 0.5,
        query_pre_attn_scalar=hidden // heads if layers == 62 else head_dim,
        layer_types=gemma3_layer_types(layers),
        local_window=window,
        local_rope_theta=float(get("rope.freq_base_swa", 10000.0)),
    )


def _rope_scaling(reader: gguf.GGUFReader, arch: str, tensors: dict[str, Any], theta: float,
                  head_dim: int, path: Path) -> dict[str, Any] | None:
    """HF-style rope_scaling from `{arch}.rope.scaling.*` keys, or from a llama3 rope_freqs tensor."""
    def get(key: str, default: Any = None) -> Any:
        return metadata_value(reader, f"{arch}.rope.{key}", default)

    kind = get("scaling.type")
    factor = get("scaling.factor") or get("scale_linear")  # scale_linear: older files
    original = get("scaling.original_context_length")
    if kind == "linear" or (kind is None and factor and factor != 1.0):
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        out: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        if original:
            out["original_max_position_embeddings"] = int(original)
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            value = get(f"scaling.{gguf_key}")
            if value is not None:
                out[hf_key] = float(value)
        return out
    if kind not in (None, "none"):
        raise ThriftyError(f"{path}: rope scaling type {kind!r} is not supported (linear, yarn and llama3 are).")
    if "rope_freqs.weight" in tensors:
        return _llama3_scaling(tensors["rope_freqs.weight"], theta, head_dim, path)
    return None


def _llama3_scaling(tensor: Any, theta: float, head_dim: int, path: Path) -> dict[str, Any] | None:
    """Recover Llama 3.1-style rope_scaling from the per-frequency factors llama.cpp stores.

    convert_hf_to_gguf writes only the factors, not the parameters they came from. The
    factor is their maximum; the low and high frequency factors are the same in every
    Llama 3.x release (1 and 4), and the original context is 8192 there (a power of two in
    Thrifty's own exports of other models). We recompute the factors from those values and
    refuse the file if none match, rather than run a model with the wrong positions.
    """
    stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64).reshape(-1)
    factor = float(stored.max())
    if factor == 1.0:
        return None
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    # Llama 3.x use 8192; other files (Thrifty's own exports of other models) a power of two.
    for original in (8192, *(2**k for k in range(4, 21))):
        low_wl, high_wl = original / 1.0, original / 4.0
        smooth = (original / wavelen - 1.0) / (4.0 - 1.0)
        expected = np.where(wavelen < high_wl, 1.0,
                            np.where(wavelen > low_wl, factor, 1 / ((1 - smooth) / factor + smooth)))
        if expected.shape == stored.shape and np.allclose(expected, stored, rtol=1e-4):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": original}
    raise ThriftyError(f"{path}: the 'rope_freqs.weight' tensor holds rope scaling factors that are not "
                       "Llama 3's (factor, low 1, high 4, an original context of a power of two); this rope scaling "
                       "is not supported.")


# ---------------------------------------------------------------- tensors


def _hf_name(gguf_name: str, arch: str) -> str | None:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    names = GEMMA3_LAYER_NAMES if arch == "gemma3" else LAYER_NAMES
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}"
    return None


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute:
    w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_complete(weights: dict[str, torch.Tensor], config: ModelConfig, path: Path) -> None:
    expected = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        expected.append("lm_head.weight")
    names = GEMMA3_LAYER_NAMES if config.gemma_norms else LAYER_NAMES
    kinds = ["attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
             "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"]
    if config.gemma_norms:
        kinds += ["post_attention_norm.weight", "post_ffw_norm.weight"]
    per_layer = [names[k] for k in kinds]
    if config.attention_bias:
        per_layer += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    if config.qk_norm:
        per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    for i in range(config.num_hidden_layers):
        expected += [f"model.layers.{i}.{n}" for n in per_layer]
    missing = [n for n in expected if n not in weights]
    if missing:
        raise ThriftyError(f"{path}: {len(missing)} tensor(s) missing, e.g. {missing[0]!r}; "
                           "the file is incomplete. Re-download or re-convert it.")

"""Model architecture description shared by every loader.

One dataclass covers the Llama family and Gemma 3; the families differ only in a
few fields (qkv bias, q/k norm, tied embeddings, rope scaling, sliding window; for
Gemma 3 its norms, GeGLU, scaled embeddings and per-layer local/global attention; for
SmolLM3 the layers without RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from thrifty.errors import ThriftyError

# model_type values in a Hugging Face config.json that this decoder implements.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma3_text")

# The MLP's gate activations (HF's names): SwiGLU's silu, Gemma's GeGLU (tanh-approximated GELU).
HIDDEN_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")

# Gemma 3's layer kinds (HF's layer_types): a sliding window with its own RoPE base, or global.
LOCAL_LAYER, GLOBAL_LAYER = "sliding_attention", "full_attention"


def gemma3_layer_types(layers: int, pattern: int = 6) -> list[str]:
    """Gemma 3's layer kinds when a config does not list them: every `pattern`-th layer
    global, the others local (llama.cpp's gemma3 loader always takes 6)."""
    return [GLOBAL_LAYER if (i + 1) % pattern == 0 else LOCAL_LAYER for i in range(layers)]


def smollm3_no_rope_layers(layers: int, interval: int = 4) -> list[int]:
    """SmolLM3's RoPE flags (HF's no_rope_layers): 0 for every `interval`-th layer, 1 for the
    others (llama.cpp's smollm3 always takes 4)."""
    return [int((i + 1) % interval != 0) for i in range(layers)]

# The dtype names a config or the CLI accepts -> torch's name for it (kept as strings so
# configs are checked without importing torch).
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or a dict like HF's rope_scaling: {"rope_type": "llama3", "factor": 8.0, ...}
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before RoPE
    sliding_window: int | None = None  # Mistral: every layer attends to at most this many past tokens
    hidden_act: str = "silu"  # one of HIDDEN_ACTIVATIONS
    # Gemma 3. Its RMSNorms scale by (1 + weight) in float32, and norm the attention's and
    # the MLP's outputs too (post_attention_layernorm, pre/post_feedforward_layernorm).
    gemma_norms: bool = False
    embedding_scale: float = 1.0  # embeddings times this (Gemma: sqrt(hidden_size))
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power, not head_dim's
    # Per layer LOCAL_LAYER or GLOBAL_LAYER (HF's layer_types); local layers attend to at
    # most local_window past tokens (HF's sliding_window) with RoPE base local_rope_theta.
    layer_types: list[str] | None = None
    local_window: int | None = None
    local_rope_theta: float | None = None
    # SmolLM3 (HF's name): per layer 1 if it applies RoPE, 0 if not (every 4th layer, "NoPE").
    no_rope_layers: list[int] | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def layer_uses_rope(self, layer: int) -> bool:
        return self.no_rope_layers is None or bool(self.no_rope_layers[layer])

    @property
    def has_local_layers(self) -> bool:
        return self.layer_types is not None and LOCAL_LAYER in self.layer_types

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face config.json dict; `source` names the file in errors."""
        model_type = hf.get("model_type")
        if model_type == "gemma3" and "text_config" in hf:
            raise ThriftyError(
                f"{source}: this is Gemma 3's image-and-text model (Gemma3ForConditionalGeneration); Thrifty "
                "runs Gemma 3's text models (model_type 'gemma3_text': gemma-3-270m, gemma-3-1b). Use one of "
                "those, or a GGUF of the text model.")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ThriftyError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"Thrifty runs {', '.join(SUPPORTED_MODEL_TYPES)} models."
            )
        gemma = model_type == "gemma3_text"
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        if act not in HIDDEN_ACTIVATIONS:
            raise ThriftyError(f"{source}: hidden activation {act!r} is not supported "
                               f"({', '.join(HIDDEN_ACTIVATIONS)} are).")
        for key in ("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention"):
            if hf.get(key):
                raise ThriftyError(f"{source}: {key} = {hf[key]!r} is not supported (Gemma 3's own models "
                                   "leave it unset).")

        def need(key: str) -> Any:
            if key not in hf:
                raise ThriftyError(f"{source}: required field {key!r} is missing.")
            return hf[key]

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = hf.get("head_dim") or hidden // heads
        # transformers >= 5 nests rope settings in rope_parameters (Gemma 3: one set per
        # layer kind); older files use rope_theta + rope_scaling at the top level.
        rope = dict(hf.get("rope_parameters") or {})
        local_rope: dict[str, Any] = {}
        if GLOBAL_LAYER in rope or LOCAL_LAYER in rope:
            local_rope = dict(rope.get(LOCAL_LAYER) or {})
            rope = dict(rope.get(GLOBAL_LAYER) or {})
        rope_theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.get("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
        sliding = hf.get("sliding_window")
        layer_types = local_window = local_theta = None
        if gemma:
            if local_rope.get("rope_type", "default") != "default":
                raise ThriftyError(f"{source}: RoPE scaling of the sliding-window layers is not supported.")
            layers = need("num_hidden_layers")
            pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
            layer_types = list(hf.get("layer_types") or gemma3_layer_types(layers, pattern))
            unknown = set(layer_types) - {LOCAL_LAYER, GLOBAL_LAYER}
            if len(layer_types) != layers or unknown:
                raise ThriftyError(f"{source}: layer_types must name {LOCAL_LAYER!r} or {GLOBAL_LAYER!r} for "
                                   f"each of the {layers} layers.")
            local_window, sliding = sliding, None  # Gemma's window is its local layers' only
            local_theta = float(local_rope.get("rope_theta") or hf.get("rope_local_base_freq") or 10000.0)
        no_rope_layers = None
        if model_type == "smollm3":
            if hf.get("use_sliding_window"):
                raise ThriftyError(f"{source}: SmolLM3 with use_sliding_window = true is not supported.")
            sliding = None
            layers, interval = need("num_hidden_layers"), hf.get("no_rope_layer_interval") or 4
            no_rope_layers = [int(flag) for flag in (hf.get("no_rope_layers")
                                                     or smollm3_no_rope_layers(layers, interval))]
            if len(no_rope_layers) != layers:
                raise ThriftyError(f"{source}: no_rope_layers must hold one 0 or 1 for each of the {layers} layers.")
        if model_type == "qwen2" or model_type == "qwen3":
            # Qwen configs carry a sliding_window value but only use it when asked to.
            if not hf.get("use_sliding_window", False):
                sliding = None
        eos = hf.get("eos_token_id")
        eos_ids = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            hidden_act=act,
            gemma_norms=gemma,
            embedding_scale=float(hidden) ** 0.5 if gemma else 1.0,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if gemma else None,
            layer_types=layer_types,
            local_window=local_window,
            local_rope_theta=local_theta,
            no_rope_layers=no_rope_layers,
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            sliding_window=sliding,
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json a Hugging Face `transformers` model of this family reads."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "smollm3": "SmolLM3ForCausalLM",
                "gemma3_text": "Gemma3ForCausalLM"}[self.model_type]
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "sliding_window": self.sliding_window,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type in ("qwen2", "qwen3", "smollm3"):
            out["use_sliding_window"] = self.sliding_window is not None
        if self.model_type == "smollm3":
            out["no_rope_layers"] = self.no_rope_layers
        if self.model_type == "gemma3_text":
            del out["hidden_act"]
            out.update({
                "hidden_activation": self.hidden_act,
                "query_pre_attn_scalar": self.query_pre_attn_scalar,
                "sliding_window": self.local_window,
                "layer_types": self.layer_types,
                # transformers >= 5 reads rope_parameters; older versions the flat keys beside it.
                "rope_parameters": {
                    GLOBAL_LAYER: {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})},
                    LOCAL_LAYER: {"rope_type": "default", "rope_theta": self.local_rope_theta},
                },
                "rope_local_base_freq": self.local_rope_theta,
                "final_logit_softcapping": None,
                "attn_logit_softcapping": None,
            })
        return out

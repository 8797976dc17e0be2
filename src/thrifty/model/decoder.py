"""One decoder for the Llama family (Llama 2/3, SmolLM/SmolLM2/SmolLM3, Qwen2/2.5, Qwen3,
Mistral) and Gemma 3's text models, which differ in a few places the config names (config.py):
(1 + w) norms around attention and MLP, GeGLU, scaled embeddings, and local layers with a
sliding window and a RoPE base of their own between global ones.

Module and parameter names follow Hugging Face's (`model.layers.0.self_attn.q_proj`),
so checkpoints load without renaming and LoRA adapters use PEFT's key names.
Nothing here is device-specific: the same code runs on CPU and CUDA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.errors import ThriftyError
from thrifty.kernels.elementwise import apply_rope, rms_norm, swiglu
from thrifty.model.config import LOCAL_LAYER, ModelConfig
from thrifty.model.kv_cache import KVCache
from thrifty.model.projections import attention, project


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gemma: bool = False) -> None:
        super().__init__()
        self.gemma = gemma  # Gemma's: scale by (1 + weight), weight zero-initialised
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemma:
            # All in float32, rounded once at the end (Llama's rounds before the weight).
            x32 = x.float()
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return rms_norm(x, self.weight, self.eps)


def _unscaled_inverse_frequencies(theta: float, dim: int) -> torch.Tensor:
    """RoPE's per-pair frequencies for base `theta`, float64, on the CPU."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))


def rope_local_inverse_frequencies(config: ModelConfig) -> torch.Tensor | None:
    """Gemma 3's local layers' frequencies (their own base, never scaled), or None."""
    if not config.has_local_layers:
        return None
    return _unscaled_inverse_frequencies(config.local_rope_theta or config.rope_theta, config.head_dim).float()


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies, with the rope_scaling variants HF configs use. Always
    on the CPU, whatever device the model is built on (meta, for loaders): a few numbers,
    moved to the activations' device on first use."""
    dim = config.head_dim
    inv_freq = _unscaled_inverse_frequencies(config.rope_theta, dim)
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq.float()
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low ones by `factor`,
        # interpolate smoothly in between.
        factor = scaling["factor"]
        low = scaling.get("low_freq_factor", 1.0)
        high = scaling.get("high_freq_factor", 4.0)
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_context / low, old_context / high
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled).float()
    raise ThriftyError(
        f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)."
    )


class Attention(nn.Module):
    # Projections that read one input, computed as a group (model/projections.py); the
    # decoding step (decoding_step.py) reads the same groups.
    PROJECTION_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",)}

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.q_size, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_size, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_size, bias=bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.gemma_norms)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.gemma_norms)
        self.local = config.layer_types is not None and config.layer_types[layer_index] == LOCAL_LAYER
        self.rope = config.layer_uses_rope(layer_index)  # SmolLM3: every 4th layer has none
        # Scores are scaled by head_dim^-1/2 unless the config says otherwise (Gemma 3).
        scalar = config.query_pre_attn_scalar
        self.scale = None if scalar is None else scalar**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        q, k, v = project(self, "qkv", projection_group(self, "qkv"), x)
        batch, seq, _ = q.shape
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # [batch, heads, seq, head_dim] for SDPA; cos/sin broadcast over heads.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        out = attention(q, k, v, mask, is_causal=mask is None and seq > 1, scale=self.scale)
        (out,) = project(self, "o", projection_group(self, "o"), out.transpose(1, 2).reshape(batch, seq, -1))
        return out


class MLP(nn.Module):
    PROJECTION_GROUPS = {"gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.geglu = config.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(self, "gate_up", projection_group(self, "gate_up"), x)
        hidden = F.gelu(gate, approximate="tanh") * up if self.geglu else swiglu(gate, up)
        (down,) = project(self, "down", projection_group(self, "down"), hidden)
        return down


def projection_group(owner: Attention | MLP, name: str) -> list[nn.Module]:
    """The linear layers of one of `owner`'s PROJECTION_GROUPS."""
    return [getattr(owner, member) for member in owner.PROJECTION_GROUPS[name]]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        size, eps, gemma = config.hidden_size, config.rms_norm_eps, config.gemma_norms
        self.input_layernorm = RMSNorm(size, eps, gemma)
        self.self_attn = Attention(config, layer_index)
        # Llama's post_attention_layernorm is the MLP's input norm; Gemma's (HF's names)
        # norms the attention's output, and two more surround the MLP.
        self.post_attention_layernorm = RMSNorm(size, eps, gemma)
        if gemma:
            self.pre_feedforward_layernorm = RMSNorm(size, eps, gemma)
            self.post_feedforward_layernorm = RMSNorm(size, eps, gemma)
        self.gemma = gemma
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache):  # type: ignore[no-untyped-def]
        if self.gemma:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Embedding):
    """nn.Embedding that leaves a weight on the meta device uninitialised: loaders build
    the model there to fill it, and nn.Embedding's normal_ on meta imports torch._dynamo
    (1.8 s of every load)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Decoder(nn.Module):
    """Embeddings, the layer stack and the final norm: HF's `model.model`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.gemma_norms)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Deliberately not a buffer: model.to(bfloat16) would round the frequencies,
        # and RoPE at long positions needs them in float32 (as the reference keeps them).
        self.inv_freq = rope_inverse_frequencies(config)
        self.local_inv_freq = rope_local_inverse_frequencies(config)

    # The final norm's weight: a plain tensor in the activations' dtype, whatever the
    # head's storage (it may be quantized).
    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype,
                    local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape [batch, 1, seq, head_dim] for integer positions [batch, seq]
        (local: for Gemma 3's local layers)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
            if self.local_inv_freq is not None:
                self.local_inv_freq = self.local_inv_freq.to(positions.device)
        inv_freq = self.local_inv_freq if local else self.inv_freq
        angles = positions.unsqueeze(-1).float() * inv_freq
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [batch, seq, hidden].

        positions: [batch, seq] token positions (default 0..seq-1, plus the cache length).
        mask: boolean [batch, 1, seq, keys], True where a query may attend to a key;
              None means plain causal attention over an unpadded batch.
        """
        cached = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(cached, cached + input_ids.shape[1], device=input_ids.device)
            positions = positions.unsqueeze(0).expand(input_ids.shape[0], -1)
        if mask is None and (cached > 0 or self.config.sliding_window is not None):
            # SDPA's is_causal assumes queries and keys start together; with a cache
            # or a sliding window the mask must be spelled out.
            mask = causal_mask(positions, cached + input_ids.shape[1], self.config.sliding_window)
        x = self.model.embed_tokens(input_ids)
        if self.config.embedding_scale != 1.0:  # rounded to the weights' dtype first, as HF's Gemma does
            x = x * torch.tensor(self.config.embedding_scale, dtype=x.dtype)
        tables = self.rope_tables(positions, x.dtype)
        if self.config.has_local_layers:
            local_tables = self.rope_tables(positions, x.dtype, local=True)
            local_mask = self._local_mask(mask, positions, cache)
        for layer in self.model.layers:
            if layer.self_attn.local:
                x = layer(x, *local_tables, local_mask, cache)
            else:
                x = layer(x, *tables, mask, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1], positions)
        return self.model.norm(x)

    def _local_mask(self, mask: torch.Tensor | None, positions: torch.Tensor,
                    cache: KVCache | None) -> torch.Tensor:
        """The mask of Gemma 3's local layers: `mask` (or plain causal attention) and at
        most local_window tokens back. Callers build one mask, without the local window;
        the window is applied here by the keys' positions (the cache remembers them)."""
        keys = positions if cache is None else torch.cat((cache.positions(), positions), dim=1)
        window = causal_mask(positions, keys.shape[1], self.config.local_window, key_positions=keys)
        return window if mask is None else mask & window

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab]. Training code should prefer hidden_states() and a
        chunked loss, which never materialises the full logits."""
        return self.logits(self.hidden_states(input_ids, positions, mask, cache))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        (logits,) = project(self, "lm_head", [self.lm_head], hidden)
        return logits


def causal_mask(
    query_positions: torch.Tensor,
    num_keys: int,
    sliding_window: int | None,
    key_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean [batch, 1, queries, keys] mask: a query sees keys at or before its position.

    key_positions [batch, keys] defaults to 0..num_keys-1 for every row; padded key
    slots should carry a position the caller masks out separately (see generation).
    """
    if key_positions is None:
        key_positions = torch.arange(num_keys, device=query_positions.device).unsqueeze(0)
    distance = query_positions.unsqueeze(-1) - key_positions.unsqueeze(1)
    allowed = distance >= 0
    if sliding_window is not None:
        allowed &= distance < sliding_window
    return allowed.unsqueeze(1)

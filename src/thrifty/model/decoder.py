"""One decoder for the Llama family: Llama 2/3, SmolLM/SmolLM2, Qwen2/2.5, Qwen3, Mistral.

Module and parameter names follow Hugging Face's (`model.layers.0.self_attn.q_proj`),
so checkpoints load without renaming and LoRA adapters use PEFT's key names.
Nothing here is device-specific: the same code runs on CPU and CUDA.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from thrifty.errors import ThriftyError
from thrifty.kernels.elementwise import apply_rope, rms_norm, swiglu
from thrifty.model.config import ModelConfig
from thrifty.model.kv_cache import KVCache
from thrifty.model.projections import attention, project


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies, with the rope_scaling variants HF configs use. Always
    on the CPU, whatever device the model is built on (meta, for loaders): a few numbers,
    moved to the activations' device on first use."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
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
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

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
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        out = attention(q, k, v, mask, is_causal=mask is None and seq > 1)
        (out,) = project(self, "o", projection_group(self, "o"), out.transpose(1, 2).reshape(batch, seq, -1))
        return out


class MLP(nn.Module):
    PROJECTION_GROUPS = {"gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(self, "gate_up", projection_group(self, "gate_up"), x)
        (down,) = project(self, "down", projection_group(self, "down"), swiglu(gate, up))
        return down


def projection_group(owner: Attention | MLP, name: str) -> list[nn.Module]:
    """The linear layers of one of `owner`'s PROJECTION_GROUPS."""
    return [getattr(owner, member) for member in owner.PROJECTION_GROUPS[name]]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache):  # type: ignore[no-untyped-def]
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
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


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

    # The final norm's weight: a plain tensor in the activations' dtype, whatever the
    # head's storage (it may be quantized).
    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape [batch, 1, seq, head_dim] for integer positions [batch, seq]."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        angles = positions.unsqueeze(-1).float() * self.inv_freq
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
        cos, sin = self.rope_tables(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.model.norm(x)

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

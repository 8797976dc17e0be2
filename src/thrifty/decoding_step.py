"""One decoding step of the whole model (one new token per row) as a plain sequence of
native kernel calls.

Through the modules, a decoding step dispatched ~25 Python-level calls per layer
(module calls, the fused groups' lookups, autograd Function wrappers, kernel-choice
checks) around the ~10 kernels that do the work: ~11 of the step's ~80 ms for 32 rows.
Within one generate call nothing changes the weights (fused_linear.weights_frozen), so
the kernels and their operands are resolved once per call here, and each step runs the
same arithmetic in the same order as DecoderLayer.forward: the results are identical,
bit for bit (tested).

It applies to what the native decoding kernels take: bf16 on a CPU with AMX, every
projection group fused, no q/k norms, a head_dim the attention kernel takes, and at
most fused_linear.DECODE_ROWS rows; otherwise generation runs the modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty import native_kernels
from thrifty.fused_linear import DECODE_ROWS, FusedLinear, fused_for_inference
from thrifty.kv_cache import KVCache
from thrifty.model import CausalLM, DecoderLayer


@dataclass
class _Layer:
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    qkv: FusedLinear
    o: FusedLinear
    gate_up: FusedLinear
    down: FusedLinear


class DecodingStep:
    """model.hidden_states for one token per row, in a weights_frozen() block."""

    def __init__(self, model: CausalLM, layers: list[_Layer]) -> None:
        self.model = model
        self.layers = layers
        self.elementwise = native_kernels.elementwise()
        self.attention = native_kernels.decode_attention()

    @classmethod
    def for_model(cls, model: CausalLM) -> DecodingStep | None:
        """The step for `model` as its weights are now, or None if the kernels do not apply."""
        config = model.config
        attention = native_kernels.decode_attention()
        if (model.dtype != torch.bfloat16 or model.device.type != "cpu" or config.qk_norm
                or native_kernels.elementwise() is None or attention is None
                or not attention.decode_attention_supports(config.head_dim)):
            return None
        layers = [_plan(layer) for layer in model.model.layers]
        if any(layer is None for layer in layers):
            return None
        return cls(model, layers)  # type: ignore[arg-type]

    def __call__(self, token_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 cache: KVCache) -> torch.Tensor | None:
        """Final-norm hidden states [rows, hidden] for token_ids [rows] at positions
        [rows, 1]; None when there are too many rows for the decoding kernels."""
        rows = token_ids.shape[0]
        if rows > DECODE_ROWS:
            return None
        config, native = self.model.config, self.elementwise
        heads, kv_heads, head_dim, eps = (config.num_attention_heads, config.num_key_value_heads,
                                          config.head_dim, config.rms_norm_eps)
        x = self.model.model.embed_tokens(token_ids)
        cos, sin = self.model.rope_tables(positions, x.dtype)
        for index, layer in enumerate(self.layers):
            h = native.rms_norm_forward(x, layer.input_norm, eps)[0]
            q, k, v = layer.qkv.decode(h).split(layer.qkv.sizes, dim=1)
            q = native.rope_forward(q.view(rows, 1, heads, head_dim).transpose(1, 2), cos, sin)
            k = native.rope_forward(k.view(rows, 1, kv_heads, head_dim).transpose(1, 2), cos, sin)
            keys, values = cache.update(index, k, v.view(rows, 1, kv_heads, head_dim).transpose(1, 2))
            out = self.attention.decode_attention(q, keys, values, mask, head_dim ** -0.5)
            x = x + layer.o.decode(out.transpose(1, 2).reshape(rows, -1))
            h = native.rms_norm_forward(x, layer.post_attention_norm, eps)[0]
            gate, up = layer.gate_up.decode(h).split(layer.gate_up.sizes, dim=1)
            x = x + layer.down.decode(native.swiglu_forward(gate, up))
        cache.advance(1)
        return self.model.model.norm(x)


def _plan(layer: DecoderLayer) -> _Layer | None:
    attention, mlp = layer.self_attn, layer.mlp
    groups = []
    for owner, name, members in ((attention, "qkv", [attention.q_proj, attention.k_proj, attention.v_proj]),
                                 (attention, "o", [attention.o_proj]),
                                 (mlp, "gate_up", [mlp.gate_proj, mlp.up_proj]),
                                 (mlp, "down", [mlp.down_proj])):
        fused = fused_for_inference(owner, name, members)  # the modules' own cache entries
        if fused is None:
            return None
        fused.ensure_current()
        if fused.native is None:
            return None
        groups.append(fused)
    return _Layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, *groups)

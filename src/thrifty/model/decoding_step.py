"""One decoding step of the whole model (one new token per row) as one native call.

Through the modules, a decoding step dispatched ~25 Python-level calls per layer
(module calls, the fused groups' lookups, autograd Function wrappers, kernel-choice
checks) around the ~10 kernels that do the work: ~11 of the step's ~80 ms for 32 rows.
An InferencePlan is built for one version of the weights, so the kernels' operands are
gathered once per plan here (from the plan's fused groups), and each step runs every layer
in kernels/csrc/decoding_step.cpp: the same kernel calls in the same order as
DecoderLayer.forward, so the results are identical, bit for bit (tested). Issued one by
one from Python, those calls still cost ~5 ms of a ~45 ms step.

It applies to what the native decoding kernels take: bf16 on a CPU with AVX-512 BF16, every
projection group fused in the plan, no q/k norms, RoPE in every layer, Llama's norms, a
head_dim the attention kernel takes,
and at most fused_linear.DECODE_ROWS rows; otherwise generation runs the modules.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from thrifty.kernels.native import native_kernel
from thrifty.model.decoder import CausalLM, DecoderLayer
from thrifty.model.fused_linear import DECODE_ROWS, FusedLinear
from thrifty.model.kv_cache import KVCache

Groups = dict[nn.Module, dict[str, FusedLinear]]  # an InferencePlan's: owner -> group name -> fused layers


class DecodingStep:
    """model.hidden_states for one token per row, with the weights of one InferencePlan."""

    def __init__(self, model: CausalLM, layers: object) -> None:
        self.model = model
        self.layers = layers  # native DecodingLayers

    @classmethod
    def build(cls, model: CausalLM, groups: Groups) -> DecodingStep | None:
        """The step over the fused `groups` of an InferencePlan for `model`, or None if the
        kernels do not apply."""
        config = model.config
        native = native_kernel("decode_linear")
        if (model.dtype != torch.bfloat16 or model.device.type != "cpu" or config.qk_norm or config.gemma_norms
                or config.no_rope_layers is not None or native is None
                or not native.decode_attention_supports(config.head_dim)):
            return None
        layers = [_native_layer(native, layer, groups) for layer in model.model.layers]
        if any(layer is None for layer in layers):
            return None
        return cls(model, native.DecodingLayers(layers, config.num_attention_heads, config.num_key_value_heads,
                                                config.head_dim, config.rms_norm_eps))

    def __call__(self, token_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 cache: KVCache) -> torch.Tensor | None:
        """Final-norm hidden states [rows, hidden] for token_ids [rows] at positions
        [rows, 1]; None when there are too many rows for the decoding kernels."""
        if token_ids.shape[0] > DECODE_ROWS:
            return None
        x = self.model.model.embed_tokens(token_ids)
        cos, sin = self.model.rope_tables(positions, x.dtype)
        x = self.layers.step(x, cos, sin, mask, cache.keys, cache.values, cache.length)
        cache.advance(1, positions)
        return self.model.model.norm(x)


def _native_layer(native: ModuleType, layer: DecoderLayer, groups: Groups) -> object | None:
    ops = []
    # The order DecodingLayer takes: qkv, o (attention), gate_up, down (MLP).
    for owner in (layer.self_attn, layer.mlp):
        for name in owner.PROJECTION_GROUPS:
            fused = groups.get(owner, {}).get(name)
            ops.append(fused.native_op if fused is not None else None)
    if any(op is None for op in ops):
        return None
    return native.DecodingLayer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, *ops)

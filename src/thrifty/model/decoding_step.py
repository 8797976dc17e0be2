"""One decoding step of the whole model (one new token per row) as one native call.

Through the modules, a decoding step dispatched ~25 Python-level calls per layer
(module calls, the fused groups' lookups, autograd Function wrappers, kernel-choice
checks) around the ~10 kernels that do the work: ~11 of the step's ~80 ms for 32 rows.
Within one generate call nothing changes the weights (fused_linear.weights_frozen), so
the kernels' operands are gathered once per call here, and each step runs every layer
in kernels/csrc/decoding_step.cpp: the same kernel calls in the same order as
DecoderLayer.forward, so the results are identical, bit for bit (tested). Issued one by
one from Python, those calls still cost ~5 ms of a ~45 ms step.

It applies to what the native decoding kernels take: bf16 on a CPU with AVX-512 BF16, every
projection group fused, no q/k norms, a head_dim the attention kernel takes, and at
most fused_linear.DECODE_ROWS rows; otherwise generation runs the modules.
"""

from __future__ import annotations

from types import ModuleType

import torch

from thrifty.kernels.native import native_kernel
from thrifty.model.decoder import MLP, Attention, CausalLM, DecoderLayer, projection_group
from thrifty.model.fused_linear import DECODE_ROWS, fused_for_inference
from thrifty.model.kv_cache import KVCache


class DecodingStep:
    """model.hidden_states for one token per row, in a weights_frozen() block."""

    def __init__(self, model: CausalLM, layers: object) -> None:
        self.model = model
        self.layers = layers  # native DecodingLayers

    @classmethod
    def for_model(cls, model: CausalLM) -> DecodingStep | None:
        """The step for `model` as its weights are now, or None if the kernels do not apply."""
        config = model.config
        native = native_kernel("decode_linear")
        if (model.dtype != torch.bfloat16 or model.device.type != "cpu" or config.qk_norm or native is None
                or not native.decode_attention_supports(config.head_dim)):
            return None
        layers = [_plan(native, layer) for layer in model.model.layers]
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
        cache.advance(1)
        return self.model.model.norm(x)


def _plan(native: ModuleType, layer: DecoderLayer) -> object | None:
    groups = []
    # The order DecodingLayer takes: qkv, o (attention), gate_up, down (MLP).
    for owner in (layer.self_attn, layer.mlp):
        for name in owner.PROJECTION_GROUPS:
            groups.append(_native_group(owner, name))
    if any(group is None for group in groups):
        return None
    return native.DecodingLayer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, *groups)


def _native_group(owner: Attention | MLP, name: str) -> object | None:
    fused = fused_for_inference(owner, name, projection_group(owner, name))  # the modules' own cache entries
    if fused is None:
        return None
    fused.ensure_current()
    return fused.native_linear() if fused.native is not None else None

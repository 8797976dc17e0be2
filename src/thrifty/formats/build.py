"""Turn a config and a checkpoint's tensors into a CausalLM, one tensor at a time.

The model is made on the meta device (no memory), then each tensor the file yields takes
its place, converted to the model's dtype, and, when the base is to be quantized, its
linear layer is quantized as soon as its weight (and bias) are in: the bf16 copy of a
layer lives only until its own quantization. Peak memory while loading is therefore the
loaded model plus about one tensor, whatever the file (HF shards read through mmap,
GGUF blocks mapped, not copied, when they stay quantized).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from thrifty.errors import ThriftyError
from thrifty.layers.gguf_quant import GGUFEmbedding, GGUFLinear
from thrifty.layers.quant import Int8Linear, NF4Linear
from thrifty.model.config import ModelConfig
from thrifty.model.decoder import CausalLM

QUANTIZE_CHOICES = ("nf4", "int8", "gguf")


@dataclass
class GGUFBlocks:
    """A weight kept in a GGUF file's blocks: uint8 [rows, bytes per row] of type `qtype`."""

    blocks: torch.Tensor
    qtype: int
    shape: tuple[int, int]  # (rows, values per row), as the dense weight's


def build_model(config: ModelConfig, state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor | GGUFBlocks]],
                source: str, *, dtype: torch.dtype | None = None, quantize: str | None = None,
                double_quant: bool = True) -> CausalLM:
    """The model of `config` holding the tensors `state` yields (a dict, or (name, tensor)
    pairs read lazily), checked to fit. dtype: convert dense tensors to it (None: as
    stored). quantize: "nf4" / "int8" quantize the decoder's linear layers as they are
    read; GGUFBlocks entries stay in their blocks."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ThriftyError(f"quantize {quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}.")
    with torch.device("meta"):
        model = CausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    builder = _Builder(model, expected, source, dtype, quantize if quantize in ("nf4", "int8") else None,
                       double_quant)
    for name, value in (state.items() if isinstance(state, Mapping) else state):
        if name in expected:
            builder.put(name, value)
    builder.finish()
    if config.tie_word_embeddings:
        embed = model.model.embed_tokens
        if isinstance(embed, GGUFEmbedding):  # the head reads the same blocks
            model.lm_head = GGUFLinear(embed.blocks, embed.qtype, embed.embedding_dim, None, embed.compute_dtype)
        else:
            model.lm_head.weight = embed.weight
    return model


class _Builder:
    def __init__(self, model: CausalLM, expected: dict[str, tuple[int, ...]], source: str, dtype: torch.dtype | None,
                 quantize: str | None, double_quant: bool) -> None:
        self.model, self.expected, self.source = model, expected, source
        self.dtype, self.quantize, self.double_quant = dtype, quantize, double_quant
        self.loaded: set[str] = set()

    def put(self, name: str, value: torch.Tensor | GGUFBlocks) -> None:
        shape = value.shape if isinstance(value, GGUFBlocks) else tuple(value.shape)
        if tuple(shape) != self.expected[name]:
            raise ThriftyError(f"{self.source}: weight {name} has shape {tuple(shape)}, but the config implies "
                               f"{self.expected[name]}.")
        owner_name, _, attr = name.rpartition(".")
        owner = self.model.get_submodule(owner_name)
        compute = self.dtype or torch.float32
        if isinstance(value, GGUFBlocks):
            if isinstance(owner, nn.Embedding):
                new: nn.Module = GGUFEmbedding(value.blocks, value.qtype, value.shape[1], compute)
            else:  # a bias still on meta is filled when put() reaches it
                new = GGUFLinear(value.blocks, value.qtype, value.shape[1], owner.bias, compute)
            self._replace(owner_name, new)
        else:
            tensor = value if self.dtype is None else value.to(self.dtype)
            if isinstance(owner, GGUFLinear) and attr == "bias":
                owner.bias = nn.Parameter(tensor.detach(), requires_grad=False)
            else:
                setattr(owner, attr, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))
        self.loaded.add(name)
        self._quantize_if_complete(owner_name)

    def _replace(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)

    def _quantize_if_complete(self, name: str) -> None:
        """nf4 / int8: a decoder linear layer whose weight and bias are both in."""
        layer = self.model.get_submodule(name)
        if self.quantize is None or type(layer) is not nn.Linear or name == "lm_head":
            return
        if any(p.is_meta for p in layer.parameters()):
            return
        if self.quantize == "nf4":
            self._replace(name, NF4Linear.from_linear(layer, double_quant=self.double_quant))
        else:
            self._replace(name, Int8Linear.from_linear(layer))

    def finish(self) -> None:
        missing = sorted(set(self.expected) - self.loaded)
        if missing:
            raise ThriftyError(f"{self.source}: {len(missing)} weights are missing, e.g. {missing[:3]}; "
                               "the checkpoint does not match its config.")

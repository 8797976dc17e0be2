"""InferencePlan: what generation runs on, built for one weights epoch of a model.

Generation multiplies by the same weights thousands of times, so it runs on copies
made for it: each projection group's weights fused and packed for the kernel
(fused_linear.py), the LoRA adapters of a group stacked, and the native decoding step
that runs a whole token through every layer in one call (decoding_step.py). A plan
holds them for the epoch of the weights it was built from (weights_epoch.py) and is
handed to the generation engine, which refuses a plan whose epoch has passed:

    plan = InferencePlan.build(model)          # a bare generate() builds its own
    generate(model, tokenizer, prompts, plan=plan)
    ... an optimizer step advances the epoch ...
    plan = plan.for_current_weights()          # the trainer's and chat's one plan

A plan built with `quantization="q8_0"` (or "q4_0") holds the base weights as GGUF blocks
instead (GRPO's rollout_quantization): generation then samples from a quantized copy of
the model while training runs on the weights themselves.

Inside `plan.active()` the decoder's projection seam (projections.py) reads the plan's
groups when no gradients are needed; outside it the modules compute as they are. The
plan owns its copies: nothing is cached on the modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from thrifty.errors import ThriftyError
from thrifty.kernels.gguf_blocks import QUANTIZE_TO
from thrifty.model.decoder import CausalLM, projection_group
from thrifty.model.decoding_step import DecodingStep
from thrifty.model.fused_linear import FusedLinear, base_linear
from thrifty.model.projections import computing_with
from thrifty.model.weights_epoch import WeightsEpoch, weights_epoch


class InferencePlan:
    def __init__(self, model: CausalLM, epoch: WeightsEpoch, groups: dict[nn.Module, dict[str, FusedLinear]],
                 fuse: bool, quantization: str | None = None) -> None:
        self.model = model
        self.epoch = epoch
        self.groups = groups  # owner module -> group name -> its fused layers
        self.fuse = fuse
        self.quantization = quantization
        self.decoding_step = DecodingStep.build(model, groups) if fuse and quantization is None else None

    @classmethod
    def build(cls, model: CausalLM, *, fuse: bool = True, previous: InferencePlan | None = None,
              quantization: str | None = None) -> InferencePlan:
        """The plan for `model`'s weights now. fuse=False: the modules' own forwards (for
        weights a plan cannot copy, such as FSDP2's shards). `previous`, a plan for an
        earlier epoch of the same model, lends the packed base weights of the groups
        whose weights are frozen, if only trainable weights changed since. quantization:
        None, or the GGUF block type the base weights are held in ("q8_0", "q4_0")."""
        if quantization is not None and quantization not in QUANTIZE_TO:
            raise ThriftyError(f"an inference plan quantizes to {' or '.join(QUANTIZE_TO)}, not {quantization!r}.")
        if quantization is not None and not fuse:
            raise ThriftyError("a quantized inference plan needs whole weights to quantize (not FSDP2's shards).")
        epoch = weights_epoch(model)
        reusable = (previous is not None and previous.model is model and previous.fuse
                    and previous.quantization == quantization
                    and previous.epoch.frozen_number == epoch.frozen_number)
        groups: dict[nn.Module, dict[str, FusedLinear]] = {}
        if fuse:
            with torch.no_grad():
                for owner, name in _projection_groups(model):
                    layers = [model.lm_head] if owner is model else projection_group(owner, name)
                    bases = [base_linear(layer) for layer in layers]
                    if any(base is None for base in bases):
                        continue  # quantized, DoRA, merged: the layers' own forwards
                    old = previous.group(owner, name) if reusable else None  # type: ignore[union-attr]
                    frozen = all(not p.requires_grad for base in bases for p in base.parameters())
                    groups.setdefault(owner, {})[name] = FusedLinear(layers, old.base if old and frozen else None,
                                                                     quantization)
        return cls(model, epoch, groups, fuse, quantization)

    def is_current(self) -> bool:
        return self.epoch == weights_epoch(self.model)

    def for_current_weights(self) -> InferencePlan:
        """This plan while its epoch lasts, else a new one (reusing what it can)."""
        return self if self.is_current() else InferencePlan.build(self.model, fuse=self.fuse, previous=self,
                                                                  quantization=self.quantization)

    def check_current(self) -> None:
        if not self.is_current():
            raise ThriftyError(
                f"this inference plan was built for weights epoch {self.epoch.number}, but the model's weights "
                f"have changed since (epoch {weights_epoch(self.model).number}); use plan.for_current_weights().")

    def group(self, owner: nn.Module, name: str) -> FusedLinear | None:
        return self.groups.get(owner, {}).get(name)

    @contextlib.contextmanager
    def active(self) -> Iterator[InferencePlan]:
        """The block in which the model's no-gradient forwards compute with this plan."""
        self.check_current()
        with computing_with(self):
            yield self


def _projection_groups(model: CausalLM) -> Iterator[tuple[nn.Module, str]]:
    for layer in model.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for name in owner.PROJECTION_GROUPS:
                yield owner, name
    yield model, "lm_head"

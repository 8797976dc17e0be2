"""The weights epoch: which version of its weights a model holds.

Weights change in a few known places only: loading, applying or loading an adapter,
merging, resuming a checkpoint, and the training run's optimizer step. Each advances
the model's epoch, and whatever was derived from the weights for inference (an
InferencePlan) records the epoch it was built for, so it is current exactly while the
epoch is unchanged. Nothing compares tensor addresses or version counters.

Two counters, because most training changes only the trainable weights: a LoRA
optimizer step leaves the frozen base as it was, and an inference plan for the next
epoch reuses what it derived from the base (fused, packed copies) and rebuilds only
what depends on the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn


@dataclass(frozen=True)
class WeightsEpoch:
    number: int = 0  # advances on every change
    frozen_number: int = 0  # advances when weights that do not require grad (or the modules) change


def weights_epoch(model: nn.Module) -> WeightsEpoch:
    return getattr(model, "weights_epoch", None) or WeightsEpoch()  # a model never changed: epoch 0


def advance_weights_epoch(model: nn.Module, *, trainable_only: bool = False) -> WeightsEpoch:
    """Record that `model`'s weights changed: only those with requires_grad (an
    optimizer step), or possibly any weight and module (load, merge, resume, adapters)."""
    epoch = weights_epoch(model)
    epoch = replace(epoch, number=epoch.number + 1,
                    frozen_number=epoch.frozen_number + (0 if trainable_only else 1))
    model.weights_epoch = epoch  # a plain attribute: state of the model, not a cache
    return epoch

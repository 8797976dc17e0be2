"""Learning-rate schedules: linear warmup, then linear decay, cosine decay or constant.

The same formulas as transformers' get_linear/cosine/constant_schedule_with_warmup, as
a pure function of the step: the learning rate of optimizer step k (0-based) is
learning_rate * lr_factor(k, ...). Being stateless, a resumed run needs nothing but
the step number to continue the schedule exactly.
"""

from __future__ import annotations

import math
from typing import Literal

ScheduleType = Literal["linear", "cosine", "constant"]


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """warmup_steps if given, else ceil(warmup_ratio * total_steps) (HF's rule)."""
    if warmup_steps > 0:
        return warmup_steps
    return math.ceil(warmup_ratio * total_steps)


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: ScheduleType) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr_scheduler_type {kind!r}")

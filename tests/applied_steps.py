"""Which optimizer steps a trainer applies: tells an exact resume from a silent restart,
which would log the same (deterministic) metrics."""

from __future__ import annotations

from typing import Any


def record_applied_steps(trainer: Any) -> list[int]:
    """The numbers of the optimizer steps `trainer`'s run applies from now on, in order
    (the real step runs; this only notes its number)."""
    applied: list[int] = []
    real = trainer.run.optimizer_step

    def step(number: int, **options):  # type: ignore[no-untyped-def]
        applied.append(number)
        return real(number, **options)

    trainer.run.optimizer_step = step
    return applied

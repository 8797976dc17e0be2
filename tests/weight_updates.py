"""Final weights of two runs that computed the same steps with sums added in different
orders (micro-batches, processes), compared element by element with a derived bound."""

from __future__ import annotations

import torch

# The runs compared with `assert_same_updates` use this AdamW epsilon instead of 1e-8.
# AdamW's update is lr * m / (sqrt(v) + eps): with eps = 1e-8 a gradient element that is
# only rounding noise around zero (terms that cancel) gets an update of about +-lr whatever
# the noise's size, so two summation orders could end a whole lr per step apart there
# (seen once: 6.6e-5 with lr 1e-3). With eps = 1e-5 a gradient difference d moves the
# update by at most lr * d / eps; allowing d up to 1e-8 (tens of float32 ulps of these
# tiny models' gradient elements, which are at most ~1e-2) bounds that by lr * 1e-3 per
# step, and float32 rounding of the weights themselves adds 1e-4 relative.
COMPARED_ADAM_EPSILON = 1e-5
GRADIENT_ROUNDING = 1e-8


def assert_same_updates(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, steps: int,
                        learning_rate: float) -> None:
    """Every element within steps * lr * GRADIENT_ROUNDING / eps + 1e-4 |w| + 1e-6.
    A wrong gradient in any element (a dropped micro-batch, a missing world-size factor, a
    token counted twice) moves that element's update by up to lr per step, hundreds of
    times the bound; measured differences are ~1e-6."""
    assert got.keys() == expected.keys()
    drift = steps * learning_rate * GRADIENT_ROUNDING / COMPARED_ADAM_EPSILON
    for name in expected:
        bound = drift + 1e-6 + 1e-4 * expected[name].abs()
        excess = (got[name] - expected[name]).abs() - bound
        assert excess.max() <= 0, (name, float((got[name] - expected[name]).abs().max()), int((excess > 0).sum()))

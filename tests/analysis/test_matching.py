"""Parameter matching: widths found within the tolerance, in both directions, and a clear error otherwise."""

from __future__ import annotations

import pytest
import torch

from unetseg.analysis.grid import AblationError
from unetseg.analysis.matching import match_width
from unetseg.nets import UNet

NUM_CLASSES = 4


@pytest.mark.parametrize(
    ("variant", "direction"),
    [({"long_skip": "add"}, 1), ({"long_skip": "none", "block": "dense"}, 1), ({"block": "residual"}, -1)],
)
def test_match_width_reaches_the_target_within_tolerance(variant, direction):
    channels = (16, 32, 64, 128)
    target = UNet(channels=channels, out_channels=NUM_CLASSES).parameter_counts()["total"]

    def build(widths):
        return UNet(channels=tuple(widths), out_channels=NUM_CLASSES, **variant)

    own = sum(p.numel() for p in build(channels).parameters())
    assert (own - target) * direction < 0  # the variant starts below (widen) or above (narrow) the target
    widths, params, multiplier = match_width(build, channels, target, tolerance=0.02)
    assert abs(params - target) <= 0.02 * target
    assert sum(p.numel() for p in build(widths).parameters()) == params  # counted again, on the CPU
    assert (multiplier - 1) * direction > 0


def test_match_width_says_when_the_tolerance_cannot_be_met():
    def build(widths):
        return torch.nn.Conv2d(1, widths[0], 3)

    with pytest.raises(AblationError, match=r"could not match 25 parameters within 1.0%"):
        match_width(build, (2,), target=25, tolerance=0.01)  # 10 parameters per channel: 20 or 30

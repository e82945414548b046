"""Deep-supervision loss (unetseg.losses): nnU-Net's weights, nearest label resizing, the weighted sum checked
by hand, and gradients into every head of a real deep-supervised UNet."""

from __future__ import annotations

import doctest
import itertools

import pytest
import torch
import torch.nn.functional as F

import unetseg.losses
from unetseg.losses import (
    DeepSupervisionLoss,
    SegmentationLoss,
    deep_supervision_weights,
    downsample_label,
)
from unetseg.nets import UNet


def test_weights_halve_per_level_and_sum_to_one():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(2) == pytest.approx([2 / 3, 1 / 3])
    assert deep_supervision_weights(4) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])
    # nnU-Net's own nets output the level next to the bottleneck too and give it weight 0
    assert deep_supervision_weights(5, exclude_lowest=True) == pytest.approx(
        [1 / 1.875, 0.5 / 1.875, 0.25 / 1.875, 0.125 / 1.875, 0.0]
    )
    with pytest.raises(ValueError, match=r"exclude_lowest=True needs at least 2 outputs"):
        deep_supervision_weights(1, exclude_lowest=True)
    with pytest.raises(ValueError, match=r"num_outputs=0 must be a positive integer"):
        deep_supervision_weights(0)


def test_labels_are_downsampled_to_the_centre_pixel_of_each_block():
    label = torch.arange(16).reshape(1, 4, 4)
    assert downsample_label(label, [2, 2]).tolist() == [[[5, 7], [13, 15]]]  # rows/cols 1 and 3
    assert downsample_label(label, [4, 4]) is label
    assert downsample_label(label, [1, 2]).tolist() == [[[9, 11]]]  # row floor(0.5 * 4) = 2
    assert downsample_label(label, [4, 2]).dtype == torch.int64


@pytest.mark.parametrize(
    ("size", "out"),
    [((37, 30), (19, 15)), ((37, 30), (10, 8)), ((9, 17, 12), (5, 9, 6)), ((9, 17, 12), (3, 5, 3))],
)
def test_label_downsampling_is_torchs_nearest_exact_without_mixing_classes(size, out):
    label = torch.randint(0, 5, (2, *size), generator=torch.Generator().manual_seed(0))
    resized = downsample_label(label, out)
    expected = F.interpolate(label[:, None].float(), size=out, mode="nearest-exact")[:, 0].long()
    assert torch.equal(resized, expected)
    assert set(resized.unique().tolist()) <= set(label.unique().tolist())


def test_weighted_sum_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (2, 4, 6), generator=g)
    full, half, quarter = (torch.randn(2, 3, h, w, generator=g) for h, w in ((4, 6), (2, 3), (1, 2)))
    # by hand: labels at rows/cols floor((j + 0.5) * n_in / n_out)
    label_half = label[:, [1, 3]][:, :, [1, 3, 5]]
    label_quarter = label[:, [2]][:, :, [1, 4]]
    ce = F.cross_entropy
    expected = (4 * ce(full, label) + 2 * ce(half, label_half) + ce(quarter, label_quarter)) / 7
    loss = DeepSupervisionLoss(SegmentationLoss("ce"))
    torch.testing.assert_close(loss([full, half, quarter], label), expected)
    weighted = DeepSupervisionLoss(SegmentationLoss("ce"), weights=[1, 3, 0])  # normalised: 0.25, 0.75, 0
    torch.testing.assert_close(
        weighted([full, half, quarter], label), 0.25 * ce(full, label) + 0.75 * ce(half, label_half)
    )
    torch.testing.assert_close(loss(full, label), ce(full, label))  # one tensor: the plain loss


def test_zero_weight_outputs_are_not_computed():
    calls: list[tuple[int, ...]] = []

    def spy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(label.shape))
        return logits.mean()

    loss = DeepSupervisionLoss(spy, weights=deep_supervision_weights(3, exclude_lowest=True))
    loss([torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)], torch.zeros(1, 8, 8))
    assert calls == [(1, 8, 8), (1, 4, 4)]


@pytest.mark.parametrize(
    ("weights", "outputs", "message"),
    [
        ([1, -1], 2, r"weights=\[1.0, -1.0\] must be finite, >= 0 and not all 0"),
        ([0, 0], 2, r"must be finite, >= 0 and not all 0"),
        ([1, 1], 3, r"DeepSupervisionLoss has 2 weights but the net returned 3 outputs"),
    ],
)
def test_bad_weights_are_named(weights, outputs, message):
    logits = [torch.randn(1, 2, 8 // 2**i, 8 // 2**i) for i in range(outputs)]
    with pytest.raises(ValueError, match=message):
        DeepSupervisionLoss(SegmentationLoss("ce"), weights=weights)(
            logits, torch.zeros(1, 8, 8, dtype=torch.long)
        )


def test_first_output_must_have_the_label_size():
    loss = DeepSupervisionLoss(SegmentationLoss("ce"))
    with pytest.raises(
        ValueError, match=r"labels' spatial size \(8, 8\), got outputs of shapes \[\(1, 2, 4, 4\)"
    ):
        loss([torch.randn(1, 2, 4, 4)], torch.zeros(1, 8, 8, dtype=torch.long))


def test_loss_is_float32_under_bf16_autocast():
    outputs = [torch.randn(2, 3, 16, 16).bfloat16(), torch.randn(2, 3, 8, 8).bfloat16()]
    label = torch.randint(0, 3, (2, 16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = DeepSupervisionLoss(SegmentationLoss("dice_ce"))(outputs, label)
    assert value.dtype == torch.float32 and torch.isfinite(value)


@pytest.mark.parametrize(
    ("long_skip", "spatial_dims"), list(itertools.product(["concat", "add", "none"], [2, 3]))
)
def test_gradients_of_the_loss_reach_every_head_of_a_real_unet(long_skip, spatial_dims):
    torch.manual_seed(0)
    net = UNet(spatial_dims, 1, 3, (4, 8, 16, 32, 64), long_skip=long_skip, deep_supervision=True)
    size = (20, 18) if spatial_dims == 2 else (18, 17, 16)
    label = torch.randint(0, 3, (2, *size))
    DeepSupervisionLoss(SegmentationLoss("dice_ce"))(net(torch.randn(2, 1, *size)), label).backward()
    assert len(net.ds_heads) == 2
    for head in [net.head, *net.ds_heads]:
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_docstring_examples():
    result = doctest.testmod(unetseg.losses)
    assert result.failed == 0 and result.attempted >= 4

"""Sliding-window inference and flip TTA: agreement with whole-image prediction, wiring into val/test."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn
from torch.utils.data import DataLoader

from tests._trainer import quiet_trainer
from unetseg import SegmentationModule, UNet
from unetseg.data.synthetic import SyntheticSegmentation
from unetseg.inference.inferer import Inferer, flip_axes
from unetseg.training.cli import main


def _pointwise(spatial_dims: int, seed: int = 0) -> nn.Module:
    """A 1x1 conv: exactly translation equivariant with no spatial context."""
    torch.manual_seed(seed)
    conv = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(2, 3, kernel_size=1)
    return conv.eval()


@pytest.mark.parametrize(
    ("shape", "roi", "overlap", "mode", "sw_batch_size"),
    [
        ((61, 47), 16, 0.5, "gaussian", 4),
        ((61, 47), [20, 12], 0.25, "constant", 1),
        ((40, 40), 64, 0.5, "gaussian", 2),  # window larger than the image: padded, then cropped
        ((19, 23, 17), 8, 0.5, "gaussian", 3),
        ((19, 23, 17), [10, 6, 8], 0.75, "constant", 8),
    ],
)
def test_sliding_window_equals_full_image_for_a_pointwise_net(shape, roi, overlap, mode, sw_batch_size):
    # The blend weights are normalized per voxel, so a net without spatial context gives exactly its
    # whole-image output whatever the windows, overlap, blending and batching.
    net = _pointwise(len(shape))
    image = torch.randn(2, 2, *shape)
    inferer = Inferer(roi_size=roi, overlap=overlap, mode=mode, sw_batch_size=sw_batch_size)
    with torch.no_grad():
        out = inferer(net, image)
        full = net(image)
    assert type(out) is torch.Tensor and out.shape == full.shape
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)


def test_sliding_window_unet_matches_whole_image_within_tolerance_gaussian_best():
    # A UNet in eval mode (BatchNorm with running statistics) is translation equivariant away from the
    # window borders; Gaussian blending down-weights those borders, so it must beat constant blending.
    torch.manual_seed(0)
    net = UNet(channels=(4, 8, 16), out_channels=4, norm="batch").eval()
    image = SyntheticSegmentation(1, 96, 2, split="val")[0]["image"][None]
    errors = {}
    with torch.no_grad():
        full = net(image)
        for mode in ("gaussian", "constant"):
            out = Inferer(roi_size=48, overlap=0.5, mode=mode)(net, image)
            errors[mode] = ((out - full).abs().mean() / full.abs().mean()).item()
            assert (out.argmax(1) == full.argmax(1)).float().mean() > 0.99
    assert errors["gaussian"] < 0.01 and errors["constant"] < 0.05
    assert errors["gaussian"] < errors["constant"]


def test_blending_options_reach_monai():
    # A predictor with spatial context (window mean) makes the blending visible; ours equals MONAI's call.
    image = torch.linspace(0, 1, 50 * 30).reshape(1, 1, 50, 30)

    def window_mean(x):
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()

    outputs = {}
    for mode in ("gaussian", "constant"):
        ours = Inferer(roi_size=[16, 16], overlap=0.5, mode=mode, sigma_scale=0.2)(window_mean, image)
        theirs = sliding_window_inference(image, [16, 16], 4, window_mean, 0.5, mode, 0.2)
        torch.testing.assert_close(ours, torch.as_tensor(theirs))
        outputs[mode] = ours
    assert not torch.allclose(outputs["gaussian"], outputs["constant"])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_flip_tta_is_the_mean_over_every_flip_combination(spatial_dims):
    torch.manual_seed(1)
    conv = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(1, 2, kernel_size=3, padding=1).eval()
    image = torch.randn(1, 1, *([9, 7, 5][:spatial_dims]))
    axes = [(), *[(a,) for a in range(2, 2 + spatial_dims)]]
    if spatial_dims == 2:
        axes.append((2, 3))
    else:
        axes += [(2, 3), (2, 4), (3, 4), (2, 3, 4)]
    with torch.no_grad():
        expected = sum(conv(image.flip(a)).flip(a) if a else conv(image) for a in axes) / len(axes)
        out = Inferer(flip_tta=True)(conv, image)
        plain = Inferer()(conv, image)
    assert sorted(flip_axes(spatial_dims)) == sorted(axes)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, plain)  # the 3x3 conv is not flip invariant: TTA changes the output


def test_flip_tta_with_sliding_window_keeps_pointwise_nets_exact():
    net = _pointwise(2)
    image = torch.randn(1, 2, 33, 21)
    with torch.no_grad():
        out = Inferer(roi_size=16, flip_tta=True)(net, image)
        torch.testing.assert_close(out, net(image), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"roi_size": 0}, r"roi_size=0"),
        ({"roi_size": [16, -1]}, r"roi_size=\[16, -1\]"),
        ({"overlap": 1.0}, r"overlap=1.0 must be in \[0, 1\)"),
        ({"mode": "linear"}, r"mode='linear' is not one of \['gaussian', 'constant'\]"),
        ({"sigma_scale": 0}, r"sigma_scale=0"),
        ({"sw_batch_size": 0}, r"sw_batch_size=0"),
    ],
)
def test_inferer_rejects_bad_arguments_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Inferer(**kwargs)


def test_roi_size_must_match_the_image_dimensions():
    with pytest.raises(ValueError, match=r"roi_size=\[8, 8, 8\] has 3 entries; the image has 2 spatial axes"):
        Inferer(roi_size=[8, 8, 8])(_pointwise(2), torch.rand(1, 2, 16, 16))


class _ShapeRecorder(nn.Module):
    """1x1 conv that records the spatial size of every input it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=1)
        self.out_channels = 2
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape[2:]))
        return self.conv(x)


def _loader(n: int = 2, size: int = 32) -> DataLoader:
    items = [
        {"image": torch.randn(1, size, size), "label": (torch.rand(size, size) > 0.5).long()}
        for _ in range(n)
    ]
    return DataLoader(items, batch_size=2)


def test_validation_and_test_use_the_inferer_while_training_runs_forward(tmp_path):
    net = _ShapeRecorder()
    module = SegmentationModule(net, inference=Inferer(roi_size=[16, 16], overlap=0.0, sw_batch_size=1))
    trainer = quiet_trainer(
        default_root_dir=tmp_path, max_steps=1, limit_val_batches=1, num_sanity_val_steps=0
    )
    trainer.fit(module, train_dataloaders=_loader(), val_dataloaders=_loader())
    assert net.seen[0] == (32, 32)  # the training step: the whole patch
    assert set(net.seen[1:]) == {(16, 16)} and len(net.seen[1:]) == 2 * 4  # val: 2 images x 4 windows
    net.seen.clear()
    trainer.test(module, dataloaders=_loader())
    assert set(net.seen) == {(16, 16)}
    net.seen.clear()
    preds = trainer.predict(module, dataloaders=_loader())
    assert set(net.seen) == {(16, 16)} and preds[0].shape == (2, 32, 32)


def test_inference_is_configurable_from_the_cli_and_restored_from_the_checkpoint(tmp_path, run_args):
    result = main(
        [
            "--config",
            "debug",
            *run_args,
            "--trainer.enable_progress_bar",
            "false",
            "--model.inference.roi_size",
            "[16, 16]",
            "--model.inference.mode",
            "constant",
            "--model.inference.flip_tta",
            "true",
            "--test",
            "false",
        ]
    )
    expected = Inferer(roi_size=[16, 16], mode="constant", flip_tta=True)
    assert result.model.inference == expected
    restored = SegmentationModule.load_for_inference(result.best_model_path)
    assert restored.inference == expected
    image = torch.randn(1, 1, 40, 24)
    with torch.no_grad():
        torch.testing.assert_close(restored.infer(image), expected(result.model.cpu().eval(), image))

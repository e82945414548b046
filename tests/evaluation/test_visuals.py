"""Validation overlays: PNG panels on disk, W&B images with named class masks, every N epochs, rank 0."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tests._wandb import config, history, offline_run
from unetseg import SegmentationModule, UNet
from unetseg.evaluation.overlays import PALETTE, SegmentationOverlays, middle_slice, overlay_panel
from unetseg.training.cli import main

QUIET = [
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--test",
    "false",
]


def test_panel_colours_exactly_the_labelled_pixels():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 12, 10)).astype(np.float32)
    label = np.zeros((12, 10), np.uint8)
    label[2:5, 3:7] = 1
    label[8, :] = 2
    pred = np.zeros_like(label)
    pred[6:9, 1:3] = 3
    panel = overlay_panel(image, label, pred, alpha=0.5)
    raw, truth, predicted = panel[:, :10], panel[:, 10:20], panel[:, 20:]
    assert (raw[..., 0] == raw[..., 1]).all() and (raw[..., 1] == raw[..., 2]).all()  # grey image
    for overlay, mask in ((truth, label), (predicted, pred)):
        changed = (overlay != raw).any(-1)
        np.testing.assert_array_equal(changed, mask > 0)
        for cls in np.unique(mask[mask > 0]):  # halfway between the grey value and the class colour
            expected = (raw[mask == cls].astype(float) + np.asarray(PALETTE[cls])) / 2
            assert np.abs(overlay[mask == cls] - expected).max() <= 1


def test_middle_slice_of_3d_arrays_only():
    volume = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(middle_slice(volume, 3), volume[..., 2])
    np.testing.assert_array_equal(middle_slice(volume[0], 2), volume[0])


def _wandb_images(save_dir) -> list[dict]:
    return [row for row in history(offline_run(save_dir)) if "val/overlays/_type" in row]


def test_overlays_every_n_epochs_as_png_and_wandb_images_with_named_classes(tmp_path, run_args):
    result = main(
        [
            "--config",
            "debug",
            *run_args,
            *QUIET,
            "--logging.wandb",
            "true",
            "--trainer.max_epochs",
            "3",
            "--trainer.callbacks=[]",  # drop the base config's callbacks: this test sets its own
            "--trainer.callbacks+=unetseg.evaluation.SegmentationOverlays",
            "--trainer.callbacks.every_n_epochs",
            "2",
            "--trainer.callbacks.num_samples",
            "3",
        ]
    )
    folder = tmp_path / "runs" / "debug" / "version_0" / "overlays"
    assert sorted(p.name for p in folder.iterdir()) == [
        f"epoch{e:03d}_{i}.png" for e in (0, 2) for i in range(3)
    ]
    val = result.datamodule.datasets["val"]
    for i in range(3):  # the first validation samples, in order: the ground-truth panel shows their labels
        panel = np.asarray(Image.open(folder / f"epoch002_{i}.png"))
        assert panel.shape == (32, 96, 3)
        label = val[i]["label"].numpy()
        changed = (panel[:, 32:64] != panel[:, :32]).any(-1)
        np.testing.assert_array_equal(changed, label > 0)
    rows = _wandb_images(tmp_path / "runs")
    assert len(rows) == 2  # epochs 0 and 2
    assert all(r["val/overlays/count"] == 3 and r["val/overlays/_type"] == "images/separated" for r in rows)
    masks = rows[0]["val/overlays/all_masks"][0]
    assert set(masks) == {"ground_truth", "prediction"}
    labels = config(offline_run(tmp_path / "runs"))["_wandb"]["mask/class_labels"]
    names = {entry["value"]["1"] for entry in labels.values()}
    assert names == {result.datamodule.class_names[1]}
    assert rows[0]["val/overlays/captions"] == ["val_00000", "val_00001", "val_00002"]


def test_every_n_epochs_zero_turns_it_off(tmp_path, run_args):
    main(
        [
            "--config",
            "debug",
            *run_args,
            *QUIET,
            "--logging.wandb",
            "true",
            "--trainer.callbacks=[]",  # drop the base config's callbacks: this test sets its own
            "--trainer.callbacks+=unetseg.evaluation.SegmentationOverlays",
            "--trainer.callbacks.every_n_epochs",
            "0",
        ]
    )
    assert not (tmp_path / "runs" / "debug" / "version_0" / "overlays").exists()
    assert _wandb_images(tmp_path / "runs") == []


def test_3d_samples_show_their_middle_slice(tmp_path):
    torch.manual_seed(0)
    label = torch.zeros(2, 8, 8, 5, dtype=torch.long)
    label[:, 2:6, 2:6, 2] = 1  # only the middle slice (5 // 2) is labelled
    items = [{"image": torch.randn(1, 8, 8, 5), "label": label[i]} for i in range(2)]
    module = SegmentationModule(UNet(spatial_dims=3, channels=(4, 8)), class_names=["bg", "fg"])
    callback = SegmentationOverlays(num_samples=2, output_dir=str(tmp_path))
    trainer = L.Trainer(
        default_root_dir=tmp_path, logger=False, callbacks=[callback], enable_progress_bar=False
    )
    trainer.validate(module, DataLoader(items, batch_size=2))
    panels = [np.asarray(Image.open(p)) for p in callback.saved]
    assert len(panels) == 2 and panels[0].shape == (8, 24, 3)
    changed = (panels[0][:, 8:16] != panels[0][:, :8]).any(-1)
    np.testing.assert_array_equal(changed, label[0, :, :, 2].numpy() > 0)


def test_only_global_rank_zero_collects(tmp_path):
    class _Trainer:
        is_global_zero, sanity_checking, current_epoch = False, False, 0

    callback = SegmentationOverlays()
    assert not callback._active(_Trainer())
    _Trainer.is_global_zero = True
    assert callback._active(_Trainer())
    _Trainer.sanity_checking = True
    assert not callback._active(_Trainer())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"every_n_epochs=-1 must be >= 0"):
        SegmentationOverlays(every_n_epochs=-1)
    with pytest.raises(ValueError, match=r"alpha=0 must be in \(0, 1\]"):
        SegmentationOverlays(alpha=0)

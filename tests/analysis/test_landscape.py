"""Loss landscape: filter-normalized directions, the centre is the checkpoint's loss, seeded and saved."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn

from unetseg.analysis.landscape import Landscape, filter_normalized_direction, grid, main
from unetseg.training.cli import main as train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of a one-epoch run of configs/debug.yaml (and the validation loss Lightning logs on
    its first validation batch, with those weights)."""
    root = tmp_path_factory.mktemp("landscape_run")
    result = train(
        [
            "--config", "debug",
            "--trainer.max_epochs", "1",
            "--trainer.limit_val_batches", "1",
            "--test", "false",
            "--trainer.precision", "32-true",  # validate() in float32, as the landscape evaluates
            "--trainer.default_root_dir", str(root),
            "--logging.save_dir", str(root / "runs"),
        ]
    )  # fmt: skip
    ckpt = result.best_model_path  # one epoch: the only checkpointed weights
    validated = result.trainer.validate(result.model, datamodule=result.datamodule, ckpt_path=ckpt)
    return ckpt, validated[0]["val/loss"]


def test_centre_equals_the_checkpoint_loss_and_outputs_are_written(checkpoint, tmp_path):
    ckpt, val_loss = checkpoint
    out = tmp_path / "land"
    main(["--ckpt", ckpt, "--out", str(out), "--num_batches", "1", "--steps_1d", "5", "--steps_2d", "3"])
    land = Landscape.load(out / "landscape.npz")
    # Lightning's validation of the same checkpoint on the same (first) batch gives the same loss
    assert land.center_loss == pytest.approx(val_loss, rel=1e-5)
    assert land.loss_1d[2] == pytest.approx(val_loss, rel=1e-5) and land.alphas_1d[2] == 0.0
    assert land.loss_2d[1, 1] == pytest.approx(val_loss, rel=1e-5)
    assert land.loss_2d.shape == (3, 3) and np.isfinite(land.loss_2d).all()
    assert land.loss_1d[0] != pytest.approx(land.loss_1d[2])  # moving along d1 changes the loss
    with (out / "landscape_2d.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9
    assert float(rows[4]["alpha"]) == float(rows[4]["beta"]) == 0.0
    assert float(rows[4]["loss"]) == pytest.approx(land.center_loss)
    for name in ("landscape_1d.png", "landscape_2d.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_same_checkpoint_and_seed_give_the_same_surface(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    common = ["--ckpt", ckpt, "--num_batches", "1", "--steps_1d", "3", "--steps_2d", "3"]
    main([*common, "--out", str(tmp_path / "a"), "--seed", "7"])
    main([*common, "--out", str(tmp_path / "b"), "--seed", "7"])
    main([*common, "--out", str(tmp_path / "c"), "--seed", "8"])
    a, b, c = (Landscape.load(tmp_path / x / "landscape.npz") for x in "abc")
    assert np.array_equal(a.loss_2d, b.loss_2d) and np.array_equal(a.loss_1d, b.loss_1d)
    assert a.center_loss == c.center_loss  # the centre does not depend on the directions
    assert not np.allclose(a.loss_2d, c.loss_2d)


def test_directions_are_filter_normalized_and_zero_for_biases_and_norms():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ConvTranspose2d(5, 4, 2, stride=2))
    direction = filter_normalized_direction(net, torch.Generator().manual_seed(0))
    for p, d in zip(net.parameters(), direction, strict=True):
        assert d.shape == p.shape
        if p.dim() == 1:
            assert torch.count_nonzero(d) == 0
        else:
            torch.testing.assert_close(d.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1))
            assert not torch.allclose(d, p)


def test_grid_is_symmetric_with_an_exact_zero_and_needs_odd_steps():
    points = grid(0.5, 7)
    assert points[3] == 0.0 and points[0] == -0.5 and points[-1] == 0.5
    assert np.allclose(points, -points[::-1])
    for steps in (4, 1, 2):
        with pytest.raises(ValueError, match=rf"steps={steps} must be an odd integer >= 3"):
            grid(1.0, steps)


def test_missing_checkpoint_or_config_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--ckpt", str(tmp_path / "nope.ckpt")])
    assert exit_.value.code == 2
    assert "nope.ckpt does not exist" in capsys.readouterr().err
    lone = tmp_path / "lone.ckpt"
    torch.save({"state_dict": {}}, lone)
    with pytest.raises(SystemExit):
        main(["--ckpt", str(lone)])
    assert "no config for" in capsys.readouterr().err

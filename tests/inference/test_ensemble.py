"""Ensembles in predict: the mean of the models' softmax probabilities, each model with its own inference."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from unetseg.inference.inferer import Inferer
from unetseg.inference.predict import Predictor
from unetseg.inference.predict import main as predict_main

WINDOWED = Inferer(roi_size=[16, 16], overlap=0.5, flip_tta=True)


def _copy_with(source: str, path: Path, edit: Callable[[dict[str, Any]], None]) -> str:
    """A copy of the checkpoint ``source`` at ``path``, changed by ``edit``; returns its path."""
    checkpoint = torch.load(source, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, path)
    return str(path)


def _record_windowed(checkpoint: dict[str, Any]) -> None:
    """Record sliding windows with flip TTA as the checkpoint's inference."""
    checkpoint["hyper_parameters"]["inference"] = WINDOWED.config()


@pytest.fixture(scope="module")
def windowed(ckpt_2d_other_seed, tmp_path_factory) -> str:
    return _copy_with(ckpt_2d_other_seed, tmp_path_factory.mktemp("w") / "windowed.ckpt", _record_windowed)


def _zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std()


@pytest.mark.parametrize("shape", [(1, 37, 45), (1, 20, 18, 3)], ids=["image", "volume-slice-by-slice"])
def test_ensemble_probabilities_are_the_mean_of_its_models(ckpt_2d, ckpt_2d_other_seed, windowed, shape):
    image = (np.random.default_rng(0).normal(size=shape) * 50 + 100).astype(np.float32)
    paths = [ckpt_2d, ckpt_2d_other_seed, windowed]
    singles = [Predictor.from_checkpoint(path, device="cpu") for path in paths]
    probabilities = [single.predict_probabilities(image) for single in singles]
    ensemble = Predictor.from_checkpoint(paths, device="cpu")
    assert [m.inference for m in ensemble.models] == [s.module.inference for s in singles]
    assert ensemble.models[0].inference is None and ensemble.models[2].inference == WINDOWED
    mean = ensemble.predict_probabilities(image)
    assert mean.shape == (4, *shape[1:]) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, np.mean(probabilities, axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(mean.sum(0), 1.0, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ensemble.predict_array(image), mean.argmax(0))
    for a, b in ((0, 1), (1, 2)):  # other weights, other inference: the mean is none of the models
        assert np.abs(probabilities[a] - probabilities[b]).max() > 1e-3
    one = Predictor.from_checkpoint([ckpt_2d], device="cpu")
    np.testing.assert_array_equal(one.predict_probabilities(image), probabilities[0])
    np.testing.assert_array_equal(one.predict_array(image), singles[0].predict_array(image))
    # independent reference for one model: z-score the whole image, softmax of the net's logits per slice
    x = torch.from_numpy(_zscore(image.astype(np.float64)).astype(np.float32))
    slices = [x] if len(shape) == 3 else list(x.unbind(-1))
    with torch.no_grad():
        expected = torch.stack([torch.softmax(singles[0].module.net(s[None]), 1)[0] for s in slices], -1)
    np.testing.assert_allclose(probabilities[0], expected.reshape(mean.shape).numpy(), rtol=0, atol=1e-5)


def test_cli_ensembles_a_list_repeated_flags_or_a_folder_of_folds(
    ckpt_2d, ckpt_2d_other_seed, windowed, tmp_path
):
    for fold, best in (("fold_0", ckpt_2d), ("fold_1", ckpt_2d_other_seed)):
        run = tmp_path / "cv" / fold / "version_0" / "checkpoints"
        run.mkdir(parents=True)
        shutil.copy(best, run / "best-epoch000-dice0.5000.ckpt")
        shutil.copy(windowed, run / "last.ckpt")  # not taken: best*.ckpt comes first
    pixels = (np.random.default_rng(1).random((41, 29)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    ensemble = Predictor.from_checkpoint([ckpt_2d, ckpt_2d_other_seed], device="cpu")
    expected = ensemble.predict_array(pixels[None].astype(np.float32))
    io = ["--input", str(tmp_path / "scan.png"), "--device", "cpu", "--output"]
    for i, ckpts in enumerate(
        (["--ckpt", ckpt_2d, ckpt_2d_other_seed], ["--ckpt", ckpt_2d, "--ckpt", ckpt_2d_other_seed],
         ["--ckpt", str(tmp_path / "cv")])
    ):  # fmt: skip
        assert predict_main([*ckpts, *io, str(tmp_path / f"out{i}")]) == 0, ckpts
        with Image.open(tmp_path / f"out{i}" / "scan.png") as out:
            assert out.mode == "P"
            np.testing.assert_array_equal(np.asarray(out), expected)
            rgb = np.asarray(out.convert("RGB"))
        colours = {int(c): {tuple(p) for p in rgb[expected == c]} for c in np.unique(expected)}
        assert all(len(found) == 1 for found in colours.values())  # one colour per class
        assert len({found.pop() for found in colours.values()}) == len(colours)  # a different one each


def _set_class_names(checkpoint: dict[str, Any]) -> None:
    checkpoint["hyper_parameters"]["class_names"] = ["background", "liver", "tumour", "vessel"]


def _set_normalization(checkpoint: dict[str, Any]) -> None:
    checkpoint["preprocessing"] = {**checkpoint["preprocessing"], "normalization": "minmax"}


@pytest.mark.parametrize(
    ("edit", "key"), [(_set_class_names, "class_names"), (_set_normalization, "preprocessing")]
)
def test_ensemble_members_must_agree_naming_both_files(ckpt_2d, tmp_path, capsys, edit, key):
    other = _copy_with(ckpt_2d, tmp_path / "other.ckpt", edit)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    args = ["--input", str(tmp_path / "x.png"), "--output", str(tmp_path / "o")]
    assert predict_main(["--ckpt", ckpt_2d, other, *args]) == 2
    assert f"checkpoints {ckpt_2d} and {other} disagree on {key}: " in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert predict_main(["--ckpt", ckpt_2d, ckpt_2d, *args]) == 2  # the same model twice would count double
    assert f"checkpoint {ckpt_2d} is given twice" in capsys.readouterr().err

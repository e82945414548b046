"""Predict from a checkpoint alone: real NIfTI/PNG files in and out, geometry kept, bad input reported."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from tests._trainer import quiet_trainer
from unetseg import SegmentationModule, UNet
from unetseg.data.formats.io import read_array
from unetseg.inference.cases import InputCase, class_palette, write_mask
from unetseg.inference.export import main as export_main
from unetseg.inference.predict import Predictor, find_cases
from unetseg.inference.predict import main as predict_main
from unetseg.training.cli import main

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "inference.md"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _zscore(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return (x - x.mean()) / max(float(x.std()), 1e-8)


def _expected_mask(ckpt: str, image: np.ndarray) -> np.ndarray:
    """Independent reference: z-score the whole image (what the synthetic data did), run the net, argmax."""
    net = SegmentationModule.load_for_inference(ckpt).net
    with torch.no_grad():
        return net(torch.from_numpy(_zscore(image))[None, None]).argmax(1)[0].numpy()


def test_png_mask_keeps_the_size_and_matches_the_model(ckpt_2d, tmp_path):
    rng = np.random.default_rng(0)
    pixels = (rng.random((37, 53)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    assert (
        predict_main(
            ["--ckpt", ckpt_2d, "--input", str(tmp_path / "scan.png"), "--output", str(tmp_path / "o")]
        )
        == 0
    )
    with Image.open(tmp_path / "o" / "scan.png") as out:
        assert out.size == (53, 37) and out.mode == "P"  # class indices as pixel values, with a palette
        mask = np.asarray(out)
    np.testing.assert_array_equal(mask, _expected_mask(ckpt_2d, pixels))
    assert mask.max() < 4


def test_png_masks_are_palette_images_that_viewers_show_in_colour(tmp_path):
    mask = np.zeros((12, 20), np.uint8)
    mask[2:6, 3:9], mask[7:11, 1:5], mask[:, 15:], mask[0, 19] = 1, 2, 3, 200
    path = write_mask(mask, InputCase("case_9", [tmp_path / "case_9.png"]), (12, 20), tmp_path / "out")
    assert path == tmp_path / "out" / "case_9.png"
    with Image.open(path) as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.asarray(image), mask)
        rgb = np.asarray(image.convert("RGB"))
    colours = {int(c): {tuple(int(v) for v in p) for p in rgb[mask == c]} for c in np.unique(mask)}
    assert all(len(found) == 1 for found in colours.values())  # one colour per class
    colours = {c: found.pop() for c, found in colours.items()}
    assert colours[0] == (0, 0, 0) and len(set(colours.values())) == 5
    assert len({tuple(c) for c in class_palette().tolist()}) == 256  # every uint8 class its own colour
    np.testing.assert_array_equal(read_array(path, is_mask=True), mask)  # the data readers see the indices


def _nifti(path: Path, data: np.ndarray, zooms=(0.7, 0.9, 2.5)) -> nib.Nifti1Image:
    """A NIfTI file with a rotated, shifted affine, distinct qform/sform codes, and scaled int16 data."""
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(zooms)
    affine[:3, 3] = [12.5, -30.0, 7.25]
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=4)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(2.0, -5.0)
    nib.save(img, str(path))
    return nib.load(str(path))


def test_nifti_mask_keeps_affine_and_header_geometry(ckpt_3d, tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 400, size=(20, 18, 13)).astype(np.int16)
    source = _nifti(tmp_path / "vol_a.nii.gz", data)
    assert predict_main(["--ckpt", ckpt_3d, "--input", str(tmp_path), "--output", str(tmp_path / "out")]) == 0
    out = nib.load(str(tmp_path / "out" / "vol_a.nii.gz"))
    assert out.shape == source.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, source.affine, atol=1e-6)
    for form in ("qform", "sform"):
        matrix, code = getattr(out, f"get_{form}")(coded=True)
        source_matrix, source_code = getattr(source, f"get_{form}")(coded=True)
        assert code == source_code and code in (1, 4)
        np.testing.assert_allclose(matrix, source_matrix, atol=1e-5)
    assert out.header.get_zooms() == source.header.get_zooms()
    assert out.header.get_xyzt_units() == ("mm", "sec")
    mask = np.asarray(out.dataobj)
    assert mask.dtype == np.uint8  # no scaling applied to the labels
    scaled = data.astype(np.float32) * 2.0 - 5.0  # the intensities the scanner meant (slope/intercept)
    np.testing.assert_array_equal(mask, _expected_mask(ckpt_3d, scaled))


def test_2d_model_segments_a_volume_slice_by_slice(ckpt_2d, tmp_path):
    rng = np.random.default_rng(2)
    data = rng.normal(size=(24, 20, 3)).astype(np.float32)
    _nifti(tmp_path / "vol.nii.gz", data)
    predictor = Predictor.from_checkpoint(ckpt_2d, device="cpu")
    assert predictor.slice_axis == 2
    path = predictor.predict_case(find_cases(tmp_path / "vol.nii.gz")[0], tmp_path / "out")
    mask = np.asarray(nib.load(str(path)).dataobj)
    net = predictor.module.net
    normalized = torch.from_numpy(_zscore(data * 2.0 - 5.0))  # z-score over the whole volume, then slices
    with torch.no_grad():
        for k in range(3):
            expected = net(normalized[None, None, :, :, k]).argmax(1)[0].numpy()
            np.testing.assert_array_equal(mask[:, :, k], expected)


def test_nnunet_channel_files_are_grouped_and_other_folders_are_not(tmp_path):
    grouped = tmp_path / "grouped"
    grouped.mkdir()
    for name in ("b_0001", "a_0000", "b_0000", "a_0001"):
        (grouped / f"{name}.nii.gz").write_bytes(b"")
    (grouped / "notes.txt").write_text("ignored")
    cases = find_cases(grouped)
    assert [c.case_id for c in cases] == ["a", "b"]
    assert [f.name for f in cases[1].files] == ["b_0000.nii.gz", "b_0001.nii.gz"]
    (grouped / "c.png").write_bytes(b"")
    assert [c.case_id for c in find_cases(grouped)] == ["a_0000", "a_0001", "b_0000", "b_0001", "c"]
    with pytest.raises(FileNotFoundError, match=r"no image files .* in .*empty"):
        (tmp_path / "empty").mkdir()
        find_cases(tmp_path / "empty")


def test_bad_cases_are_reported_by_file_and_the_others_still_written(ckpt_2d, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((20, 30), 7, np.uint8)).save(inputs / "good.png")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(inputs / "colour.png")
    (inputs / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "unetseg.inference.predict",
        "--ckpt",
        ckpt_2d,
        "--input",
        str(inputs),
        "--output",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 1, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]
    summary = done.stderr[done.stderr.index("2 of 3 case(s) failed") :]
    assert re.search(rf"broken: .*{re.escape(str(inputs / 'broken.nii.gz'))}", summary)
    assert re.search(
        rf"colour: .*{re.escape(str(inputs / 'colour.png'))}: 3 channel\(s\).*expects 1", summary
    )


def _other_checkpoint(path: Path) -> None:
    """A Lightning checkpoint of some other model: weights and hyperparameters, no unetseg net."""
    torch.save({"state_dict": {"layer.weight": torch.zeros(2, 2)}, "hyper_parameters": {"lr": 0.1}}, path)


def _mismatched_checkpoint(source: str, path: Path) -> None:
    """A unetseg checkpoint whose recorded net is wider than its weights."""
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["hyper_parameters"]["net"]["init_args"]["channels"] = [8, 16, 32]
    torch.save(checkpoint, path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda src, p: None, r"checkpoint not found: {path}"),
        (lambda src, p: p.write_bytes(b"garbage"), r"cannot read checkpoint {path}"),
        (lambda src, p: _other_checkpoint(p), r"{path} is not a unetseg SegmentationModule checkpoint"),
        (_mismatched_checkpoint, r"checkpoint {path}: the weights do not fit its net unetseg"),
    ],
    ids=["missing", "garbage", "other-model", "wrong-weights"],
)
def test_bad_checkpoints_stop_with_status_2_naming_the_file(ckpt_2d, tmp_path, capsys, make, message):
    path = tmp_path / "model.ckpt"
    make(ckpt_2d, path)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    assert (
        predict_main(
            ["--ckpt", str(path), "--input", str(tmp_path / "x.png"), "--output", str(tmp_path / "o")]
        )
        == 2
    )
    assert re.search(message.format(path=re.escape(str(path))), capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_unknown_normalization_needs_the_flag(ckpt_2d, tmp_path, capsys):
    checkpoint = torch.load(ckpt_2d, weights_only=True)
    checkpoint["preprocessing"] = {}
    torch.save(checkpoint, tmp_path / "bare.ckpt")
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "x.png")
    args = [
        "--ckpt",
        str(tmp_path / "bare.ckpt"),
        "--input",
        str(tmp_path / "x.png"),
        "--output",
        str(tmp_path / "o"),
    ]
    assert predict_main(args) == 2
    assert "does not record the intensity normalization" in capsys.readouterr().err
    assert predict_main([*args, "--normalization", "zscore"]) == 0
    assert (
        predict_main([*args, "--normalization", '{"name": "minmax"}', "--output", str(tmp_path / "o2")]) == 0
    )
    assert (tmp_path / "o" / "x.png").is_file() and (tmp_path / "o2" / "x.png").is_file()


def test_cuda_device_without_cuda_is_a_clear_error(ckpt_2d, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    args = [
        "--ckpt",
        ckpt_2d,
        "--input",
        str(tmp_path / "x.png"),
        "--output",
        str(tmp_path),
        "--device",
        "cuda",
    ]
    assert predict_main(args) == 2
    assert "CUDA is not available" in capsys.readouterr().err


class _RecordedNet(nn.Module):
    """A net that records its own constructor arguments (the ``init_args`` hook of ``net_config``)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, width: int = 4) -> None:
        super().__init__()
        self.init_args = {"in_channels": in_channels, "out_channels": out_channels, "width": width}
        self.out_channels = out_channels
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, out_channels, 1)
        )

    def forward(self, x):
        return self.body(x)


def test_python_built_module_with_an_init_args_net_is_restored_from_its_checkpoint(tmp_path):
    module = SegmentationModule(_RecordedNet(width=6), class_names=["bg", "fg"])
    items = [{"image": torch.randn(1, 16, 16), "label": torch.randint(0, 2, (16, 16))} for _ in range(2)]
    trainer = quiet_trainer(default_root_dir=tmp_path, max_steps=1)
    trainer.fit(module, DataLoader(items, batch_size=2))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = SegmentationModule.load_for_inference(tmp_path / "m.ckpt")
    assert isinstance(restored.net, _RecordedNet) and restored.net.init_args["width"] == 6
    assert restored.class_names == ["bg", "fg"] and not restored.training
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), module.eval()(x))


@pytest.mark.parametrize(
    "net",
    [
        lambda: UNet(channels=(4, 8, 16), out_channels=3, long_skip=("none", "add"), block="residual"),
        lambda: UNet(in_channels=2, out_channels=3, channels=[4, 8], block="dense", norm=None),
    ],
    ids=["per-level-residual", "dense"],
)
def test_python_built_unet_module_is_restored_from_its_checkpoint_alone(net, tmp_path):
    net = net()
    module = SegmentationModule(net, class_names=["bg", "a", "b"])
    trainer = quiet_trainer(default_root_dir=tmp_path, max_steps=1)
    c = net.in_channels
    items = [{"image": torch.randn(c, 16, 16), "label": torch.randint(0, 3, (16, 16))} for _ in range(2)]
    trainer.fit(module, DataLoader(items, batch_size=2))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = SegmentationModule.load_for_inference(tmp_path / "m.ckpt")
    assert isinstance(restored.net, UNet)
    assert restored.net.init_args == net.init_args and restored.net.long_skip == net.long_skip
    assert restored.net.block == net.block
    x = torch.randn(2, c, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), module.eval()(x))


def _doc_commands(prefix: str) -> list[str]:
    return [line.strip() for line in DOCS.read_text().splitlines() if line.strip().startswith(prefix)]


def test_docs_commands_run_as_written(ckpt_2d, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoints = tmp_path / "runs" / "unet_skip" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(ckpt_2d, checkpoints / "last.ckpt")
    (tmp_path / "scans").mkdir()
    rng = np.random.default_rng(3)
    _nifti(tmp_path / "scans" / "case_001.nii.gz", rng.normal(size=(30, 28, 2)).astype(np.float32))
    Image.fromarray((rng.random((33, 41)) * 255).astype(np.uint8)).save(tmp_path / "scans" / "case_002.png")

    predict = _doc_commands("python -m unetseg.inference.predict")
    export = _doc_commands("python -m unetseg.inference.export")
    assert len(predict) == 2 and len(export) == 2
    for command in predict:
        assert predict_main(shlex.split(command)[3:]) == 0, command
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["case_001.nii.gz", "case_002.png"]
    for command in export:
        assert export_main(shlex.split(command)[3:]) == 0, command
    assert (checkpoints / "last.onnx").is_file() and (checkpoints / "last.pt").is_file()

    (train,) = _doc_commands("python train.py")
    run_dir = tmp_path / "train_runs"
    result = main(
        [
            *shlex.split(train)[2:],
            "--config",
            "debug",
            "--logging.save_dir",
            str(run_dir),
            *QUIET,
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )  # the documented flags, on the debug config's tiny data and net
    log_dir = Path(result.log_dir)
    assert (log_dir / "per_case.csv").is_file() and (log_dir / "summary.json").is_file()
    assert sorted(p.name for p in (log_dir / "overlays").iterdir())[:1] == ["epoch000_0.png"]
    assert result.model.inference.roi_size == [96, 96]


@pytest.mark.gpu
def test_gpu_prediction_matches_cpu(ckpt_2d, tmp_path):
    Image.fromarray((np.random.default_rng(4).random((64, 48)) * 255).astype(np.uint8)).save(
        tmp_path / "x.png"
    )
    for device in ("cpu", "cuda"):
        args = ["--ckpt", ckpt_2d, "--input", str(tmp_path / "x.png"), "--output", str(tmp_path / device)]
        assert predict_main([*args, "--device", device]) == 0
    cpu, gpu = (np.asarray(Image.open(tmp_path / d / "x.png")) for d in ("cpu", "cuda"))
    assert (cpu == gpu).mean() > 0.999  # cuDNN may break exact ties differently

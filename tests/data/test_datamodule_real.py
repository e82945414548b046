"""SegmentationDataModule on real files: layouts via the CLI, the docs commands, bad input, splits, memory."""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import shlex
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._datafiles import (
    affine,
    make_folder2d,
    make_msd,
    make_nnunet,
    volume_image,
    volume_label,
    write_nifti,
)
from tests.data.test_formats import BAD_INPUTS
from unetseg.data import SegmentationDataModule
from unetseg.data import datamodule as dm_module
from unetseg.data.datamodule import case_ids
from unetseg.data.formats import io as formats_io
from unetseg.training.cli import main
from unetseg.training.module import SegmentationModule

REPO = Path(__file__).resolve().parents[2]
SMALL = (24, 24, 12)  # (X, Y, Z); labels have foreground in z 3..6 only (tests/_datafiles.py)
FEW_STEPS = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]


def _json(root: Path, data: dict) -> Path:
    (root / "dataset.json").write_text(json.dumps(data))
    return root


LAYOUTS = {
    # name: (writer(root), class names, input channels)
    "msd-3d": (
        lambda r: make_msd(r, n_cases=5, shape=SMALL, labels=("background", "anterior", "posterior")),
        ["background", "anterior", "posterior"],
        1,
    ),
    "msd-4d": (
        lambda r: make_msd(
            r, n_cases=5, shape=SMALL, modalities=("FLAIR", "T1w"), labels=("background", "edema", "tumour")
        ),
        ["background", "edema", "tumour"],
        2,
    ),
    "nnunet-v2": (
        lambda r: make_nnunet(r, n_cases=5, shape=SMALL, labels=("background", "PZ", "TZ")),
        ["background", "PZ", "TZ"],
        2,
    ),
    "png-folder": (lambda r: make_folder2d(r, n=5, rgb=True), ["background", "foreground"], 3),
    "tiff-folder": (
        lambda r: _json(
            make_folder2d(r, n=5, image_ext=".tif", mask_ext=".tif", mask_scale=1, rgb=False, n_classes=3),
            {"labels": {"0": "background", "1": "disc", "2": "band"}},
        ),
        ["background", "disc", "band"],
        1,
    ),
}
RUNS = [(name, 2) for name in LAYOUTS] + [(name, 3) for name in ("msd-3d", "msd-4d", "nnunet-v2")]


@pytest.mark.parametrize(("layout", "dims"), RUNS, ids=[f"{n}-{d}d" for n, d in RUNS])
def test_cli_trains_a_few_steps_on_each_layout(layout, dims, tmp_path, run_args):
    writer, names, channels = LAYOUTS[layout]
    root = writer(tmp_path / layout)
    args = ["--config", "debug", "--data.root", str(root), "--data.spatial_dims", str(dims)]
    result = main([*args, "--data.batch_size", "2", *FEW_STEPS, *run_args])
    assert result.trainer.global_step == 2
    net, data = result.model.net, result.datamodule
    # classes and channels come from the dataset, into the net and the metric names
    assert (net.in_channels, net.out_channels, net.spatial_dims) == (channels, len(names), dims)
    assert result.model.class_names == names
    for name in names[1:]:
        value = result.val_metrics[f"val/dice/{name}"]
        assert math.isnan(value) or 0.0 <= value <= 1.0
    # 5 cases, 5 folds: one validation case, every slice (2D) or the whole volume (3D) of it
    (val_case,) = data.splits.val
    assert set(case_ids(data.datasets["val"])) == {val_case.case_id}
    batch = next(iter(data.val_dataloader()))
    assert batch["image"].shape[:2] == (len(batch["case_id"]), channels)
    assert batch["image"].ndim == dims + 2 and batch["label"].shape == batch["image"].shape[:1] + batch[
        "image"
    ].shape[2:]
    assert batch["case_id"] == [val_case.case_id] * len(batch["case_id"])
    assert batch["spacing"].shape == (len(batch["case_id"]), dims)
    if dims == 3:  # whole validation volumes, one per batch
        assert batch["image"].shape[2:] == SMALL and len(batch["case_id"]) == 1


# ----------------------------------------------------------------------------------- docs commands


def _docs_commands() -> list[str]:
    """Every ``python train.py ...`` line of docs/datasets.md."""
    text = (REPO / "docs" / "datasets.md").read_text()
    return [line.strip() for line in text.splitlines() if line.strip().startswith("python train.py ")]


DOCS_COMMANDS = _docs_commands()


def _write_docs_data(data: Path) -> None:
    """The datasets the docs' commands use, tiny, under ``data`` (standing in for ``/data``)."""
    hippocampus = ("background", "Anterior", "Posterior")
    make_msd(data / "Task04_Hippocampus", n_cases=5, shape=SMALL, labels=hippocampus)
    make_msd(data / "Task02_Heart", n_cases=5, shape=SMALL, labels=("background", "left atrium"))
    make_folder2d(data / "Kvasir-SEG", n=5, size=(30, 36), image_ext=".jpg", mask_ext=".jpg")
    ids = [f"case_{i:03d}" for i in range(5)]
    split = {"train": ids[:3], "val": ids[3:4], "test": ids[4:]}
    (data / "hippocampus_splits.json").write_text(json.dumps(split))


def test_docs_list_the_commands_of_the_issue():
    joined = "\n".join(DOCS_COMMANDS)
    assert "python train.py --config unet_skip.yaml --data.root /data/Task04_Hippocampus" in DOCS_COMMANDS
    for needed in ("Task02_Heart", "Kvasir-SEG", "hippocampus3d", "--data.split_file", "--data.fold"):
        assert needed in joined


@pytest.mark.parametrize(
    "command", DOCS_COMMANDS, ids=[re.sub(r"\W+", "-", c.replace("/data/", ""))[22:] for c in DOCS_COMMANDS]
)
def test_docs_commands_train(command, tmp_path, run_args):
    data = tmp_path / "data"
    _write_docs_data(data)
    args = [arg.replace("/data/", f"{data}/") for arg in shlex.split(command)[2:]]
    few = ["--config", "debug", "--data.batch_size", "2", *FEW_STEPS]  # tiny net, 2 steps
    if "heart3d" in command:
        few += ["--data.patch_size", "[32, 32, 16]"]  # the 128 x 128 x 64 patches take 10 s on 2 cores
    result = main([*args, *few, *run_args])
    assert result.trainer.global_step == 2
    dm = result.datamodule
    expected = {"Task04_Hippocampus": ["background", "Anterior", "Posterior"],
                "Task02_Heart": ["background", "left atrium"], "Kvasir-SEG": ["background", "foreground"]}
    assert result.model.class_names == expected[Path(dm.root).name]
    assert "val/dice" in result.val_metrics
    if "split_file" in command:
        assert [c.case_id for c in dm.splits.val] == ["case_003"]
        assert case_ids(dm.datasets["test"]) == ["case_004"] * SMALL[2] and "test/dice" in result.test_metrics


# ------------------------------------------------------------------------------------------ bad input


def _cli_error(args: list[str], capsys) -> str:
    """The error a CLI run ends with: exit status 2 and its stderr, whether found at construction or when the
    data is set up (voxel-level checks)."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def no_training(monkeypatch):
    """Make any training step fail: errors must come before training starts."""

    def training_started(*args, **kwargs):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(SegmentationModule, "training_step", training_started)


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_every_bad_input_stops_the_cli_before_training_naming_the_file(name, tmp_path, run_args, capsys,
                                                                       no_training):
    builder, mutate, _, parts = BAD_INPUTS[name]
    root = tmp_path / "ds"
    if builder == "empty":
        root.mkdir()
    elif builder is not None:
        builder(root)
    if mutate is not None:
        mutate(root)
    message = _cli_error(["--config", "debug", "--data.root", str(root), "--data.num_folds", "2", *run_args],
                         capsys)
    for part in parts:
        assert part.format(root=root) in message, message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data.num_folds", "5"], r"fewer cases \(4\) than folds \(5\)"),
        (["--data.test_ids", "[case_009]"], r"unknown held-out test case id\(s\) \['case_009'\]"),
        (["--data.normalization", "zcore"], r"unknown normalization 'zcore'"),
        (["--data.normalization", "[zscore, zscore]"], r"normalization lists 2 entries.*1 input channel"),
        (["--data.augmentation", "[{HorizontalFlop: {}}]"], r"unknown augmentation 'HorizontalFlop'"),
        (["--data.target_spacing", "[1.0, 1.0]"], r"target_spacing=\[1.0, 1.0\]: expected 3 values"),
        (["--data.cache", "ssd"], r"cache='ssd'"),
    ],
)
def test_bad_data_arguments_exit_2(args, message, tmp_path, run_args, capsys):
    root = make_msd(tmp_path / "msd", n_cases=4)
    err = _cli_error(["--config", "debug", "--data.root", str(root), *args, *run_args], capsys)
    assert re.search(message, err), err


def test_2d_dataset_with_spatial_dims_3_exits_2(tmp_path, run_args, capsys):
    root = make_folder2d(tmp_path / "png")
    err = _cli_error(["--config", "debug", "--data.root", str(root), "--data.spatial_dims", "3", *run_args],
                     capsys)
    assert f"dataset {root} holds 2D images" in err and "spatial_dims=2" in err


def _undeclared_value(root: Path) -> Path:
    """Set one voxel of case_003's label to 7 (the dataset declares 0..2)."""
    label = volume_label(SMALL)
    label[0, 0, 0] = 7
    return write_nifti(root / "labelsTr" / "case_003.nii.gz", label)


def test_undeclared_mask_value_stops_the_cli_before_training(tmp_path, run_args, no_training, capsys):
    root = make_msd(tmp_path / "msd", n_cases=5, shape=SMALL)
    bad = _undeclared_value(root)
    err = _cli_error(["--config", "debug", "--data.root", str(root), *FEW_STEPS, *run_args], capsys)
    assert f"unetseg: error: label {bad} has values [7] outside the declared labels 0..2" in err
    # the Python API raises the same check as a ValueError (InvalidDatasetError)
    dm = SegmentationDataModule(root=str(root), num_folds=2)
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))} has values \[7\]"):
        dm.setup("fit")


def test_train_py_exits_non_zero_with_the_message(tmp_path):
    root = make_msd(tmp_path / "msd", n_cases=5, shape=SMALL)
    bad = _undeclared_value(root)
    command = [sys.executable, "train.py", "--config", "debug", "--data.root", str(root),
               "--trainer.default_root_dir", str(tmp_path), "--logging.save_dir", str(tmp_path / "runs")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"unetseg: error: label {bad} has values [7]" in done.stderr and "Traceback" not in done.stderr


def test_skip_bad_cases_trains_without_them_and_logs_each(tmp_path, caplog):
    root = make_msd(tmp_path / "msd", n_cases=6, shape=SMALL)
    bad = _undeclared_value(root)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    dm = SegmentationDataModule(root=str(root), num_folds=2, skip_bad_cases=True)
    with caplog.at_level(logging.WARNING):
        assert dm.num_classes == 3
        dm.setup("fit")
    used = {c.case_id for c in [*dm.splits.train, *dm.splits.val]}
    assert used == {"case_000", "case_002", "case_004", "case_005"}
    assert str(bad) in caplog.text and str(root / "labelsTr" / "case_001.nii.gz") in caplog.text
    assert "case_001" in caplog.text and "case_003" in caplog.text


# ---------------------------------------------------------------------------------- laziness, splits


def test_properties_read_dataset_json_and_headers_once_and_no_voxels(tmp_path, monkeypatch):
    root = make_nnunet(tmp_path / "nn", n_cases=4, shape=SMALL, labels=("background", "PZ", "TZ"))
    dm = SegmentationDataModule(root=str(tmp_path / "not_yet"))  # construction reads nothing
    assert dm.datasets == {}
    calls = []
    original = dm_module.detect_layout
    monkeypatch.setattr(dm_module, "detect_layout", lambda *a, **k: calls.append(a) or original(*a, **k))

    def no_voxels(*args, **kwargs):
        raise AssertionError("voxel data read for a property")

    monkeypatch.setattr(formats_io, "read_array", no_voxels)
    dm = SegmentationDataModule(root=str(root), num_folds=2)
    assert (dm.num_classes, dm.class_names, dm.in_channels) == (3, ["background", "PZ", "TZ"], 2)
    assert dm.spatial_dims == 2 and dm.class_names == ["background", "PZ", "TZ"]
    assert len(calls) == 1  # the spec is cached


def _split_ids(root: Path, **kwargs) -> dict[str, list[str]]:
    dm = SegmentationDataModule(root=str(root), check_data=False, **kwargs)
    dm.setup(None)
    return {split: case_ids(dm.datasets[split]) for split in ("train", "val", "test")}


def test_splits_are_by_case_partition_the_folds_and_are_reproducible(tmp_path):
    root = make_msd(tmp_path / "msd", n_cases=10, n_test=0, shape=(8, 8, 6))
    every = {f"case_{i:03d}" for i in range(10)}
    vals = []
    for fold in range(5):
        ids = _split_ids(root, fold=fold, num_folds=5)
        train, val = set(ids["train"]), set(ids["val"])
        assert not train & val and train | val == every and len(val) == 2
        assert len(ids["val"]) == 2 * 6 and len(ids["train"]) == 8 * 6  # every slice of a case, one split
        vals.append(val)
    assert set().union(*vals) == every  # the validation folds partition the cases
    assert _split_ids(root, fold=0) == _split_ids(root, fold=0)
    assert any(set(_split_ids(root, fold=0, split_seed=s)["val"]) != vals[0] for s in (1, 2, 3))
    held = _split_ids(root, fold=0, num_folds=3, test_ids=["case_004", "case_007"])
    assert set(held["test"]) == {"case_004", "case_007"}
    assert not {"case_004", "case_007"} & set(held["train"] + held["val"])
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": ["case_000", "case_001"], "val": ["case_009"]}))
    from_file = _split_ids(root, split_file=str(split_file), spatial_dims=3)
    assert from_file == {"train": ["case_000", "case_001"], "val": ["case_009"], "test": []}


def test_batches_carry_case_id_and_spacing(tmp_path):
    root = make_msd(tmp_path / "msd", n_cases=5, shape=SMALL)  # spacing (1, 1, 2)
    for dims, axis, spacing in [(3, 2, [1.0, 1.0, 2.0]), (2, 2, [1.0, 1.0]), (2, 0, [1.0, 2.0])]:
        dm = SegmentationDataModule(root=str(root), spatial_dims=dims, slice_axis=axis, batch_size=3)
        dm.setup("fit")
        for loader in (dm.train_dataloader(), dm.val_dataloader()):
            batch = next(iter(loader))
            assert batch["spacing"].tolist() == [spacing] * len(batch["case_id"])
            assert all(isinstance(c, str) and c.startswith("case_") for c in batch["case_id"])
        if dims == 2:
            assert batch["slice_index"].tolist() == [0, 1, 2]  # the first slices of the validation case
            assert batch["slice_spacing"].tolist() == [{2: 2.0, 0: 1.0}[axis]] * 3
    png = make_folder2d(tmp_path / "png", n=5, size=(20, 24))
    dm = SegmentationDataModule(root=str(png), resize=(40, 36), batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (1, 3, 40, 36)
    assert batch["spacing"].tolist() == [[0.5, pytest.approx(24 / 36)]]  # 20 x 24 pixels of 1.0 resized
    synthetic = SegmentationDataModule(spatial_size=16, num_val=3, batch_size=3)
    synthetic.setup("validate")
    batch = next(iter(synthetic.val_dataloader()))
    assert batch["case_id"] == ["val_00000", "val_00001", "val_00002"]
    assert batch["spacing"].tolist() == [[1.0, 1.0]] * 3


def _nifti_case(root: Path, case: str, shape: tuple[int, ...]) -> None:
    label = volume_label(shape)
    write_nifti(root / "imagesTr" / f"{case}_0000.nii.gz", volume_image(label, seed=len(case)), affine())
    write_nifti(root / "labelsTr" / f"{case}.nii.gz", label, affine())


def test_patch_size_and_validation_sizes(tmp_path):
    root = tmp_path / "nn"
    shapes = {"a": (20, 16, 12), "b": (24, 12, 10), "c": (16, 20, 8), "d": (18, 18, 9)}
    for case, shape in shapes.items():
        _nifti_case(root, case, shape)
    _json(root, {"channel_names": {"0": "MR"}, "labels": {"background": 0, "x": 1, "y": 2},
                 "file_ending": ".nii.gz"})
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["a", "b"], "val": ["c", "d"]}))
    common = {"root": str(root), "split_file": str(split), "batch_size": 2}
    # 3D, no sizes: whole training volumes padded to the largest; whole validation volumes, batch 1
    dm = SegmentationDataModule(spatial_dims=3, **common)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 1, 24, 16, 12)
    assert [tuple(b["label"].shape) for b in dm.val_dataloader()] == [(1, 16, 20, 8), (1, 18, 18, 9)]
    # 3D patch and central validation crop: batches of batch_size
    dm = SegmentationDataModule(spatial_dims=3, patch_size=8, val_crop_size=(12, 12, 6), **common)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 1, 8, 8, 8)
    assert [tuple(b["label"].shape) for b in dm.val_dataloader()] == [(2, 12, 12, 6)]
    # 2D slices along z: training slices padded to the largest training slice, validation to its own largest
    dm = SegmentationDataModule(spatial_dims=2, **common)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 1, 24, 16)
    assert {tuple(b["label"].shape[1:]) for b in dm.val_dataloader()} == {(18, 20)}
    assert len(dm.datasets["val"]) == 8 + 9
    # synthetic data: patch_size crops the training images only
    dm = SegmentationDataModule(spatial_size=32, patch_size=(16, 24), num_train=4, num_val=2)
    dm.setup("fit")
    assert dm.datasets["train"][0]["image"].shape == (1, 16, 24)
    assert dm.datasets["val"][0]["image"].shape == (1, 32, 32)


def test_oversample_one_draws_only_foreground_slices(tmp_path):
    root = make_msd(tmp_path / "msd", n_cases=5, shape=SMALL)
    dm = SegmentationDataModule(root=str(root), oversample=1.0)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 4 * SMALL[2]  # an epoch: one item per slice of the 4 training cases
    assert all(bool(dm.datasets["train"][i]["label"].any()) for i in range(len(dm.datasets["train"])))
    assert len(dm.datasets["val"]) == SMALL[2]  # validation keeps every slice


def test_memory_cache_is_preloaded_and_matches_lazy_loading(tmp_path):
    root = make_msd(tmp_path / "msd", n_cases=5, shape=SMALL)
    lazy = SegmentationDataModule(root=str(root), spatial_dims=3)
    cached = SegmentationDataModule(root=str(root), spatial_dims=3, cache="memory")
    for dm in (lazy, cached):
        dm.setup("fit")
    assert cached.loader.cached_arrays() == 6  # 5 training cases + the unlabelled imagesTs case
    assert lazy.loader.cached_arrays() <= 1
    for a, b in zip(lazy.val_dataloader(), cached.val_dataloader(), strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def _traced_bytes_after_an_epoch(root: Path, cache: str) -> int:
    """Traced bytes still allocated after one pass over the train and val loaders (datamodule kept)."""
    gc.collect()
    tracemalloc.start()
    dm = SegmentationDataModule(root=str(root), batch_size=4, cache=cache, num_folds=3)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for _ in loader:
            pass
    gc.collect()
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == len(dm.spec.cases_train) * 16
    return current


def test_memory_stays_flat_with_more_cases_when_lazy(tmp_path):
    shape = (32, 32, 16)
    small = make_nnunet(tmp_path / "small", n_cases=3, n_test=0, channels=("MR",), shape=shape)
    large = make_nnunet(tmp_path / "large", n_cases=12, n_test=0, channels=("MR",), shape=shape)
    case_bytes = int(np.prod(shape)) * (4 + 8)  # float32 image + int64 label
    growth = _traced_bytes_after_an_epoch(large, "none") - _traced_bytes_after_an_epoch(small, "none")
    assert growth < case_bytes, growth
    cached = _traced_bytes_after_an_epoch(large, "memory") - _traced_bytes_after_an_epoch(small, "memory")
    assert cached > 8 * case_bytes  # the measurement does see arrays that are kept

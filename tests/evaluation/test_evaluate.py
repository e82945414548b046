"""Per-case metrics: hand-computed values, agreement with MONAI, empty-mask conventions, test-stage files."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    compute_surface_dice,
)
from scipy.ndimage import uniform_filter
from torch import nn
from torch.utils.data import DataLoader

from tests._trainer import quiet_trainer
from tests._wandb import history, offline_run
from unetseg import SegmentationModule
from unetseg.data import SegmentationDataModule
from unetseg.evaluation.per_case import (
    CSV_COLUMNS,
    PerCaseEvaluation,
    aggregate_over_cases,
    case_metrics,
    case_rows,
)
from unetseg.training.cli import main


def test_hand_computed_case_in_physical_units():
    # Ground truth: two pixels (2, 3) and (2, 4); prediction: (2, 3). Spacing (2.0, 0.5) mm.
    # Distances pred->gt: {0}; gt->pred: {0, 0.5 mm}. HD95 = 95th percentile (linear) of {0, 0.5} = 0.475;
    # ASD (symmetric) = (0 + 0 + 0.5) / 3. Dice = 2*1 / (1 + 2), IoU = 1 / 2.
    label = np.zeros((6, 8), dtype=np.int64)
    label[2, 3:5] = 1
    pred = np.zeros_like(label)
    pred[2, 3] = 1
    m = case_metrics(pred, label, num_classes=2, spacing=(2.0, 0.5))[1]
    assert m["dice"] == pytest.approx(2 / 3) and m["iou"] == pytest.approx(0.5)
    assert m["hd95"] == pytest.approx(0.475, abs=1e-6) and m["asd"] == pytest.approx(1 / 6, abs=1e-6)
    assert (m["n_ref"], m["n_pred"]) == (2, 1)
    # Two single pixels 3 rows and 4 columns apart: distance sqrt((3*2)^2 + (4*0.5)^2) = sqrt(40) mm.
    label, pred = np.zeros((8, 8), int), np.zeros((8, 8), int)
    label[2, 3], pred[5, 7] = 1, 1
    m = case_metrics(pred, label, num_classes=2, spacing=(2.0, 0.5))[1]
    assert m["hd95"] == pytest.approx(math.sqrt(40), rel=1e-6) and m["asd"] == pytest.approx(math.sqrt(40))
    assert m["dice"] == 0 and m["iou"] == 0


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """Random smooth label map: each foreground class a thresholded blurred noise field."""
    out = np.zeros(shape, dtype=np.int64)
    for c in range(1, num_classes):
        smooth = uniform_filter(rng.standard_normal(shape), size=3)
        out[smooth > np.quantile(smooth, 0.8)] = c
    return out


def test_values_agree_with_monai_on_the_same_masks():
    rng = np.random.default_rng(0)
    shape, spacing, num_classes = (20, 24, 16), (1.5, 0.8, 2.5), 3
    label, pred = _blobs(rng, shape, num_classes), _blobs(rng, shape, num_classes)
    ours = case_metrics(pred, label, num_classes, spacing)
    one_hot = [
        F.one_hot(torch.from_numpy(a), num_classes).movedim(-1, 0)[None].float() for a in (pred, label)
    ]
    monai = {
        "dice": compute_dice(*one_hot, include_background=False),
        "iou": compute_iou(*one_hot, include_background=False),
        "hd95": compute_hausdorff_distance(*one_hot, percentile=95, spacing=spacing),
        "asd": compute_average_surface_distance(*one_hot, symmetric=True, spacing=spacing),
    }
    for c in (1, 2):
        for metric, values in monai.items():
            assert ours[c][metric] == pytest.approx(values[0, c - 1].item(), rel=1e-5), (c, metric)
    assert 0 < ours[1]["dice"] < 1 and ours[1]["hd95"] > 0  # non-trivial masks
    # spacing matters: the distances scale with it
    doubled = case_metrics(pred, label, num_classes, [2 * s for s in spacing])
    assert doubled[1]["hd95"] == pytest.approx(2 * ours[1]["hd95"], rel=1e-5)


@pytest.mark.parametrize(
    ("pred_pixels", "label_pixels", "expected"),
    [
        # both empty: undefined everywhere
        ([], [], {"dice": math.nan, "iou": math.nan, "hd95": math.nan, "asd": math.nan}),
        # hallucinated structure: overlap 0, distances = the image diagonal sqrt((10*1)^2 + (5*2)^2)
        ([(1, 1)], [], {"dice": 0.0, "iou": 0.0, "hd95": math.sqrt(200), "asd": math.sqrt(200)}),
        # missed structure: same
        ([], [(4, 2)], {"dice": 0.0, "iou": 0.0, "hd95": math.sqrt(200), "asd": math.sqrt(200)}),
        # perfect
        ([(4, 2), (4, 3)], [(4, 2), (4, 3)], {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0}),
    ],
)
def test_empty_mask_convention(pred_pixels, label_pixels, expected):
    pred, label = np.zeros((10, 5), int), np.zeros((10, 5), int)
    for r, c in pred_pixels:
        pred[r, c] = 1
    for r, c in label_pixels:
        label[r, c] = 1
    m = case_metrics(pred, label, num_classes=2, spacing=(1.0, 2.0))[1]
    for key, value in expected.items():
        assert (math.isnan(m[key]) and math.isnan(value)) or m[key] == pytest.approx(value), key


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"pred shape \(4, 4\) and label shape \(4, 5\) differ"):
        case_metrics(np.zeros((4, 4), int), np.zeros((4, 5), int), 2)
    with pytest.raises(ValueError, match=r"spacing=\[1.0\] must be 2 positive values"):
        case_metrics(np.zeros((4, 4), int), np.zeros((4, 4), int), 2, spacing=[1.0])
    with pytest.raises(ValueError, match=r"label has values outside 0..1"):
        case_metrics(np.zeros((4, 4), int), np.full((4, 4), 2), 2)
    with pytest.raises(ValueError, match=r"pred must hold integer class indices"):
        case_metrics(np.zeros((4, 4)), np.zeros((4, 4), int), 2)


def _square(top: int, shape=(9, 8)) -> np.ndarray:
    """A 3 x 3 square of class 1 over rows ``top..top+2``, columns 2..4."""
    mask = np.zeros(shape, dtype=np.int64)
    mask[top : top + 3, 2:5] = 1
    return mask


def test_nsd_identical_far_apart_and_empty():
    label = _square(2)
    assert case_metrics(label, label, 2)[1]["nsd"] == 1.0
    far = np.zeros((30, 8), dtype=np.int64)
    far[25:28, 2:5] = 1
    assert case_metrics(far, np.pad(label, ((0, 21), (0, 0))), 2, nsd_tolerance=3.0)[1]["nsd"] == 0.0
    empty = np.zeros_like(label)
    assert case_metrics(empty, label, 2)[1]["nsd"] == 0.0  # missed structure
    assert math.isnan(case_metrics(empty, empty, 2)[1]["nsd"])  # undefined, left out of means


def test_nsd_of_a_one_voxel_shift_by_hand():
    # The surface of a 3 x 3 square is its 8 border pixels. Shifted down one row, 4 of the 8 border pixels of
    # each square lie on the other's border (distance 0) and 4 one row away (distance 1 spacing unit).
    label, pred = _square(2), _square(3)
    assert case_metrics(pred, label, 2, nsd_tolerance=1.0)[1]["nsd"] == 1.0  # shift within the tolerance
    assert case_metrics(pred, label, 2, nsd_tolerance=0.5)[1]["nsd"] == pytest.approx(8 / 16)
    # rows 2 mm apart: the shift is 2 mm, beyond a 1 mm tolerance. Within 1 mm: the 4 border pixels of each
    # square on the other's border, and one pixel each whose nearest border pixel is 1 column (1 mm) away.
    m = case_metrics(pred, label, 2, spacing=(2.0, 1.0), nsd_tolerance=1.0)[1]
    assert m["nsd"] == pytest.approx(10 / 16)
    # the same shift along columns of 0.5 mm is within tolerance; 2 mm tolerance covers the 2 mm rows
    shifted = np.roll(label, 1, axis=1)
    assert case_metrics(shifted, label, 2, spacing=(2.0, 0.5), nsd_tolerance=1.0)[1]["nsd"] == 1.0
    assert case_metrics(pred, label, 2, spacing=(2.0, 1.0), nsd_tolerance=2.0)[1]["nsd"] == 1.0


def test_nsd_per_class_tolerance_and_agreement_with_monai():
    rng = np.random.default_rng(3)
    shape, spacing, num_classes = (20, 24, 16), (1.5, 0.8, 2.5), 3
    label, pred = _blobs(rng, shape, num_classes), _blobs(rng, shape, num_classes)
    ours = case_metrics(pred, label, num_classes, spacing, nsd_tolerance={1: 1.0, 2: 3.0})
    one_hot = [
        F.one_hot(torch.from_numpy(a), num_classes).movedim(-1, 0)[None].float() for a in (pred, label)
    ]
    monai = compute_surface_dice(*one_hot, [1.0, 3.0], spacing=list(spacing))
    assert ours[1]["nsd"] == pytest.approx(monai[0, 0].item(), rel=1e-6)
    assert ours[2]["nsd"] == pytest.approx(monai[0, 1].item(), rel=1e-6)
    assert 0 < ours[1]["nsd"] < 1
    names = ["background", "organ", "lesion"]
    rows = case_rows("c", pred, label, names, spacing, nsd_tolerance={"organ": 1.0, "lesion": 3.0})
    assert [r["nsd"] for r in rows] == [ours[1]["nsd"], ours[2]["nsd"]]
    with pytest.raises(ValueError, match=r"has no value for class\(es\) \[2\]"):
        case_metrics(pred, label, num_classes, nsd_tolerance={1: 1.0})
    with pytest.raises(
        ValueError, match=r"unknown class\(es\) \['liver'\], missing class\(es\) \['lesion'\]"
    ):
        case_rows("c", pred, label, names, nsd_tolerance={"organ": 1, "liver": 2})
    with pytest.raises(ValueError, match=r"nsd_tolerance_mm=-1.0: expected a finite number >= 0"):
        PerCaseEvaluation(nsd_tolerance_mm=-1.0)


def test_callback_nsd_per_class_tolerance_in_csv_summary_and_logs(tmp_path):
    rng = np.random.default_rng(4)
    labels = [np.pad(_blobs(rng, (10, 10, 8), 3), ((1, 1), (0, 0), (0, 0))) for _ in range(2)]
    preds = [np.roll(g, 1, axis=0) for g in labels]
    spacings = [torch.tensor([3.0, 1.0, 1.0]), torch.tensor([0.5, 2.0, 2.0])]
    items = _batch_items(preds, labels, case_id=["p1", "p2"], spacing=spacings)
    tolerance = {"organ": 1.0, "lesion": 3.0}
    callback = PerCaseEvaluation(output_dir=str(tmp_path / "eval"), nsd_tolerance_mm=tolerance)
    module = SegmentationModule(_Oracle(3), class_names=["background", "organ", "lesion"])
    metrics = _trainer(tmp_path, callback).test(module, DataLoader(items, batch_size=1), verbose=False)[0]
    with (tmp_path / "eval" / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        i = int(r["case_id"][1]) - 1
        expected = case_metrics(preds[i], labels[i], 3, spacings[i].tolist(), nsd_tolerance={1: 1.0, 2: 3.0})
        assert float(r["nsd"]) == pytest.approx(expected[1 if r["class"] == "organ" else 2]["nsd"])
    # p1: the one-voxel shift is 3 mm along axis 0, beyond organ's 1 mm and within lesion's 3 mm tolerance
    assert float(rows[0]["nsd"]) < 1 and float(rows[1]["nsd"]) == 1.0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    organ = np.mean([float(r["nsd"]) for r in rows if r["class"] == "organ"])
    assert summary["per_class"]["organ"]["nsd"]["mean"] == pytest.approx(organ)
    assert metrics["test/nsd/organ"] == pytest.approx(organ)
    assert metrics["test/nsd"] == pytest.approx(summary["foreground_mean"]["nsd"])
    bad = PerCaseEvaluation(output_dir=str(tmp_path / "bad"), nsd_tolerance_mm={"organ": 1.0})
    with pytest.raises(ValueError, match=r"missing class\(es\) \['lesion'\]"):
        _trainer(tmp_path, bad).test(module, DataLoader(items, batch_size=1), verbose=False)


def test_summary_is_mean_and_median_over_defined_cases_and_foreground_mean_of_class_means():
    nan = math.nan
    rows = [
        {"case_id": "a", "class": "organ", "dice": 0.5, "iou": 0.3, "hd95": 4.0, "asd": 1.0},
        {"case_id": "b", "class": "organ", "dice": 0.7, "iou": 0.5, "hd95": 2.0, "asd": 1.0},
        {"case_id": "c", "class": "organ", "dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0},
        {"case_id": "a", "class": "lesion", "dice": nan, "iou": nan, "hd95": nan, "asd": nan},
        {"case_id": "b", "class": "lesion", "dice": 0.2, "iou": 0.1, "hd95": 10.0, "asd": 3.0},
        {"case_id": "c", "class": "lesion", "dice": 0.0, "iou": 0.0, "hd95": 30.0, "asd": 9.0},
    ]
    s = aggregate_over_cases(rows, ["background", "organ", "lesion"])
    assert s["num_cases"] == 3
    assert s["per_class"]["organ"]["dice"] == {"mean": pytest.approx(2.2 / 3), "median": 0.7, "n": 3}
    assert s["per_class"]["lesion"]["dice"] == {
        "mean": pytest.approx(0.1),
        "median": pytest.approx(0.1),
        "n": 2,
    }
    assert s["per_class"]["lesion"]["hd95"]["mean"] == 20.0
    assert s["foreground_mean"]["dice"] == pytest.approx((2.2 / 3 + 0.1) / 2)
    assert s["foreground_mean"]["hd95"] == pytest.approx((2.0 + 20.0) / 2)


class _Oracle(nn.Module):
    """Returns its input as logits: images that are one-hot masks make the predictions exactly known."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.out_channels = num_classes
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale


def _batch_items(preds, labels, **extra):
    items = []
    for i, (p, g) in enumerate(zip(preds, labels, strict=True)):
        item = {"image": F.one_hot(torch.as_tensor(p), 3).movedim(-1, 0).float(), "label": torch.as_tensor(g)}
        items.append({**item, **{k: v[i] for k, v in extra.items()}})
    return items


def _trainer(tmp_path, callback) -> L.Trainer:
    return quiet_trainer(default_root_dir=tmp_path, callbacks=[callback])


def test_callback_uses_case_ids_and_spacing_from_the_batch(tmp_path):
    rng = np.random.default_rng(1)
    labels = [np.pad(_blobs(rng, (10, 10, 8), 3), ((1, 1), (0, 0), (0, 0))) for _ in range(3)]
    preds = [np.roll(g, 1, axis=0) for g in labels]  # off by one voxel along axis 0 (empty border: no wrap)
    spacings = [torch.tensor([3.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.5, 2.0, 2.0])]
    items = _batch_items(preds, labels, case_id=["p1", "p2", "p3"], spacing=spacings)
    callback = PerCaseEvaluation(output_dir=str(tmp_path / "eval"))
    module = SegmentationModule(_Oracle(3), class_names=["background", "organ", "lesion"])
    metrics = _trainer(tmp_path, callback).test(module, DataLoader(items, batch_size=2), verbose=False)[0]

    with (tmp_path / "eval" / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [(r["case_id"], r["class"]) for r in rows] == [
        (c, k) for c in ("p1", "p2", "p3") for k in ("organ", "lesion")
    ]
    for r in rows:
        i = int(r["case_id"][1]) - 1
        expected = case_metrics(preds[i], labels[i], 3, spacings[i].tolist())[
            1 if r["class"] == "organ" else 2
        ]
        for key in ("dice", "iou", "hd95", "asd"):
            assert float(r[key]) == pytest.approx(expected[key]), (r["case_id"], key)
    # a one-voxel shift along axis 0 costs one voxel of that axis's spacing at most (3 mm for p1)
    assert 0 < float(rows[0]["hd95"]) <= 3.0 + 1e-6
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["num_cases"] == 3
    organ_hd = [float(r["hd95"]) for r in rows if r["class"] == "organ"]
    assert summary["per_class"]["organ"]["hd95"]["mean"] == pytest.approx(np.mean(organ_hd))
    assert metrics["test/hd95/organ"] == pytest.approx(np.mean(organ_hd))
    assert metrics["test/case_dice"] == pytest.approx(summary["foreground_mean"]["dice"])


def test_callback_without_case_ids_uses_spacing_one_and_stacks_2d_slices_per_case(tmp_path):
    rng = np.random.default_rng(2)
    # case A: 3 slices sent out of order across batches; case B: 2 slices; plus 2 plain 2D images
    volume_a, volume_b = _blobs(rng, (8, 8, 3), 3), _blobs(rng, (8, 8, 2), 3)
    pred_a, pred_b = np.roll(volume_a, 1, axis=1), volume_b.copy()
    slices = [("A", 2), ("B", 0), ("A", 0), ("B", 1), ("A", 1)]
    labels = [(volume_a if c == "A" else volume_b)[..., s] for c, s in slices]
    preds = [(pred_a if c == "A" else pred_b)[..., s] for c, s in slices]
    items = _batch_items(
        preds,
        labels,
        case_id=[c for c, _ in slices],
        slice_index=[s for _, s in slices],
        spacing=[torch.tensor([1.0, 2.0])] * 5,
        slice_spacing=[4.0] * 5,
    )
    plain = _batch_items([volume_a[..., 0], volume_b[..., 0]], [volume_a[..., 1], volume_b[..., 1]])
    callback = PerCaseEvaluation(output_dir=str(tmp_path))
    module = SegmentationModule(_Oracle(3), class_names=["background", "organ", "lesion"])
    _trainer(tmp_path, callback).test(module, DataLoader(items + plain, batch_size=1))
    by_case = {(r["case_id"], r["class"]): r for r in callback.rows}
    assert {c for c, _ in by_case} == {"A", "B", "case_00005", "case_00006"}  # unnamed: index in the test set
    expected_a = case_metrics(pred_a, volume_a, 3, (1.0, 2.0, 4.0))  # one volume, slice spacing 4
    for key in ("dice", "iou", "hd95", "asd"):
        assert by_case[("A", "organ")][key] == pytest.approx(expected_a[1][key])
    assert by_case[("B", "lesion")]["dice"] == 1.0
    expected_plain = case_metrics(volume_a[..., 0], volume_a[..., 1], 3)  # spacing 1
    assert by_case[("case_00005", "organ")]["hd95"] == pytest.approx(expected_plain[1]["hd95"])


def test_cli_test_stage_writes_files_and_logs_to_wandb(tmp_path, run_args):
    result = main(
        [
            "--config",
            "debug",
            *run_args,
            "--logging.wandb",
            "true",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks+=unetseg.evaluation.PerCaseEvaluation",
        ]
    )
    with open(f"{result.log_dir}/per_case.csv") as f:
        rows = list(csv.DictReader(f))
    classes = result.datamodule.class_names[1:]
    assert len(rows) == 4 * len(classes)  # debug config: 4 test images
    assert {r["class"] for r in rows} == set(classes)
    summary = json.loads(open(f"{result.log_dir}/summary.json").read())
    assert set(summary["per_class"]) == set(classes) and summary["num_cases"] == 4
    for key in (
        "test/case_dice",
        "test/case_iou",
        "test/hd95",
        "test/asd",
        *(f"test/hd95/{c}" for c in classes),
    ):
        assert key in result.test_metrics
    logged = {k for row in history(offline_run(tmp_path / "runs")) for k in row}
    assert {"test/hd95", "test/asd/organ", "test/case_dice"} <= logged
    assert any(k.startswith("test/per_case") for k in logged)  # the W&B table


DDP_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from unetseg.training.cli import main
main(["--config", "debug", "--logging.save_dir", sys.argv[1], "--trainer.default_root_dir", sys.argv[1],
      "--trainer.enable_progress_bar", "false", "--trainer.strategy", "ddp", "--trainer.devices", "2",
      "--trainer.accelerator", "cpu", "--data.num_test", "5",
      "--trainer.callbacks+=unetseg.evaluation.PerCaseEvaluation"])
"""


@pytest.mark.slow
def test_ddp_gathers_every_case_once_and_matches_a_single_process(tmp_path):
    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "runs")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "debug" / "version_0"
    with (run / "per_case.csv").open() as f:
        ddp_rows = list(csv.DictReader(f))
    assert sorted({r["case_id"] for r in ddp_rows}) == [
        f"test_{i:05d}" for i in range(5)
    ]  # 5 cases on 2 ranks
    assert len(ddp_rows) == 5 * 3
    # the same checkpoint evaluated in one process gives the same rows
    (ckpt,) = (run / "checkpoints").glob("best-*.ckpt")
    module = SegmentationModule.load_for_inference(ckpt)
    data = SegmentationDataModule(spatial_size=32, num_train=8, num_val=4, num_test=5, batch_size=4)
    callback = PerCaseEvaluation(output_dir=str(tmp_path / "single"))
    _trainer(tmp_path, callback).test(module, datamodule=data)
    single = {(r["case_id"], r["class"]): r for r in callback.rows}
    for row in ddp_rows:
        for key in ("dice", "iou", "hd95", "asd"):
            expected = single[(row["case_id"], row["class"])][key]
            assert (math.isnan(expected) and row[key] == "nan") or float(row[key]) == pytest.approx(
                expected, rel=1e-5
            )

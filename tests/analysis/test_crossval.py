"""Cross-validation command: every fold an ordinary training run, resume, out-of-fold metrics recomputed from
the written files, postprocessing decided on them, ``predict --ckpt DIR`` averaging the folds, errors."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests._datafiles import make_msd
from unetseg.analysis import crossval, runner
from unetseg.data import detect_layout, make_splits
from unetseg.evaluation.per_case import METRICS, case_metrics
from unetseg.inference import predict
from unetseg.inference.postprocess import Postprocessing, apply_postprocessing, decide_postprocessing
from unetseg.inference.predict import Predictor

FOLDS = 3
N_CASES = 6  # training cases case_000 .. case_005; case_006 is the (unlabelled) test image
CLASSES = ["background", "a", "b"]
FAST = [
    "--config", "debug",
    "--trainer.max_epochs", "3",
    "--model.optimizer.init_args.lr", "0.01",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip
RUN_ONE = runner.run_one


class Spy:
    """Wraps ``runner.run_one`` and records the runs it trains."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def __call__(self, run, out_dir):
        self.ran.append(run.id)
        return RUN_ONE(run, out_dir)


def _run(root: Path, out: Path, *extra: str) -> tuple[int, list[str]]:
    """``crossval.main`` on ``root`` into ``out``; its exit status and the folds it trained."""
    spy = Spy()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "run_one", spy)
        args = ["--data.root", str(root), "--folds", str(FOLDS), "--out", str(out), "--device", "cpu"]
        status = crossval.main([*FAST, *args, *extra])
    return status, spy.ran


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A 3-fold cross-validation of a 6-case MSD dataset, run once for the tests of this module."""
    base = tmp_path_factory.mktemp("crossval")
    root = make_msd(base / "Task01_Toy", n_cases=N_CASES, n_test=1)
    out = base / "cv"
    status, ran = _run(root, out)
    assert status == 0
    return root, out, ran


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _nifti(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _best(out: Path, fold: int) -> Path:
    (ckpt,) = (out / f"fold_{fold}" / "version_0" / "checkpoints").glob("best-*.ckpt")
    return ckpt


def test_every_fold_is_one_training_run_and_a_rerun_trains_nothing(study):
    root, out, ran = study
    assert ran == [f"fold_{k}" for k in range(FOLDS)]
    for k in range(FOLDS):
        result = json.loads((out / f"fold_{k}" / "result.json").read_text())
        assert result["args"][-10:] == [
            "--data.fold", str(k), "--data.num_folds", str(FOLDS), "--logging.save_dir", str(out),
            "--logging.name", f"fold_{k}", "--trainer.default_root_dir", str(out / f"fold_{k}"),
        ]  # fmt: skip
        assert result["best_model_path"] == str(_best(out, k)) and result["epochs"] == 3
        assert [p.name for p in (out / f"fold_{k}").glob("version_*")] == ["version_0"]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("fold_*/**/*") if p.is_file()}
    status, ran = _run(root, out)
    assert status == 0 and ran == []
    assert {p: p.stat().st_mtime_ns for p in out.glob("fold_*/**/*") if p.is_file()} == stamps
    # a fold whose result is lost is trained again from scratch, the others are kept
    (out / "fold_1" / "result.json").unlink()
    status, ran = _run(root, out)
    assert status == 0 and ran == ["fold_1"]
    assert [p.name for p in (out / "fold_1").glob("version_*")] == ["version_0"]
    # other training settings for finished folds are refused
    status, ran = _run(root, out, "--trainer.max_epochs", "4")
    assert status == 2 and ran == []


def test_out_of_fold_rows_are_the_metrics_of_the_written_predictions(study):
    root, out, _ = study
    spec = detect_layout(root)
    fold_of = {c.case_id: k for k in range(FOLDS) for c in make_splits(spec, k, FOLDS).val}
    rows = _read_csv(out / "oof" / "per_case.csv")
    assert sorted((r["case_id"], r["class"]) for r in rows) == [
        (f"case_{i:03d}", c) for i in range(N_CASES) for c in CLASSES[1:]
    ]
    predictors = {k: Predictor.from_checkpoint(_best(out, k), device="cpu") for k in range(FOLDS)}
    for case_id in sorted(fold_of):
        image_file = root / "imagesTr" / f"{case_id}.nii.gz"
        image = nib.load(str(image_file))
        spacing = image.header.get_zooms()[:3]
        prediction = _nifti(out / "oof" / "predictions" / f"{case_id}.nii.gz")
        label = _nifti(root / "labelsTr" / f"{case_id}.nii.gz")
        # predicted by the best checkpoint of the fold that held the case out
        expected_mask = predictors[fold_of[case_id]].predict_array(
            np.asarray(image.dataobj, np.float32)[None], spacing
        )
        np.testing.assert_array_equal(prediction, expected_mask)
        expected = case_metrics(prediction.astype(np.int64), label.astype(np.int64), 3, spacing)
        for row in (r for r in rows if r["case_id"] == case_id):
            assert int(row["fold"]) == fold_of[case_id]
            values = expected[CLASSES.index(row["class"])]
            for metric in METRICS:
                value = float(row[metric])
                assert (math.isnan(value) and math.isnan(values[metric])) or value == pytest.approx(
                    values[metric], rel=1e-6
                ), (case_id, row["class"], metric)
    assert any(float(r["dice"]) > 0.5 for r in rows)  # the folds learned something


def test_summary_is_the_mean_and_std_of_the_csv_and_the_folds_checkpoints(study):
    _, out, _ = study
    rows = _read_csv(out / "oof" / "per_case.csv")
    summary = json.loads((out / "oof" / "summary.json").read_text())
    assert summary["num_cases"] == N_CASES and summary["nsd_tolerance"] == 1.0
    class_means = []
    for name in CLASSES[1:]:
        for metric in METRICS:
            values = [float(r[metric]) for r in rows if r["class"] == name and r[metric] != "nan"]
            stats = summary["per_class"][name][metric]
            assert stats["mean"] == pytest.approx(np.mean(values)) and stats["n"] == len(values)
            assert stats["std"] == pytest.approx(np.std(values, ddof=1))
        class_means.append(summary["per_class"][name]["dice"]["mean"])
    assert summary["foreground_mean"]["dice"] == pytest.approx(np.mean(class_means))
    assert {k: v["checkpoint"] for k, v in summary["folds"].items()} == {
        str(k): str(_best(out, k)) for k in range(FOLDS)
    }
    md = (out / "oof" / "summary.md").read_text()
    a = summary["per_class"]["a"]["dice"]
    assert f"| a | {a['mean']:.4f} ± {a['std']:.4f} ({a['n']}) |" in md
    assert f"| **foreground mean** | {summary['foreground_mean']['dice']:.4f} |" in md


def test_postprocessing_is_decided_on_the_out_of_fold_predictions(study):
    root, out, _ = study
    pairs = [
        (_nifti(p).astype(np.int64), _nifti(root / "labelsTr" / p.name).astype(np.int64))
        for p in sorted((out / "oof" / "predictions").glob("*.nii.gz"))
    ]
    assert len(pairs) == N_CASES
    saved = Postprocessing.from_json(out / "postprocessing.json")
    assert saved == decide_postprocessing(pairs, CLASSES)
    md = (out / "oof" / "summary.md").read_text()
    before, after = saved.dice_before["a"], saved.dice_after["a"]
    assert f"| a | {before:.4f} | {after:.4f} |" in md and str(saved) in md


def test_predict_on_the_folder_averages_the_folds_and_applies_the_postprocessing(study, tmp_path, capsys):
    root, out, _ = study
    new_image = root / "imagesTs" / "case_006.nii.gz"
    args = ["--ckpt", str(out), "--input", str(new_image), "--device", "cpu", "--output"]
    assert predict.main([*args, str(tmp_path / "pp")]) == 0
    assert f"ensemble of {FOLDS} models" in capsys.readouterr().err
    assert predict.main([*args, str(tmp_path / "raw"), "--postprocessing", "none"]) == 0
    image = nib.load(str(new_image))
    array, spacing = np.asarray(image.dataobj, np.float32)[None], image.header.get_zooms()[:3]
    probabilities = [
        Predictor.from_checkpoint(_best(out, k), device="cpu").predict_probabilities(array, spacing)
        for k in range(FOLDS)
    ]
    mean = np.mean(probabilities, axis=0)
    expected = mean.argmax(0).astype(np.uint8)
    np.testing.assert_array_equal(_nifti(tmp_path / "raw" / "case_006.nii.gz"), expected)
    postprocessing = Postprocessing.from_json(out / "postprocessing.json")
    np.testing.assert_array_equal(
        _nifti(tmp_path / "pp" / "case_006.nii.gz"), apply_postprocessing(expected, postprocessing)
    )
    assert not all(np.array_equal(probabilities[0], p) for p in probabilities[1:])  # three different models


def test_cluster_commands_train_one_fold_each(tmp_path, capsys):
    root = make_msd(tmp_path / "Task01_Toy", n_cases=4, n_test=0)
    out = tmp_path / "cv"
    args = [*FAST, "--data.root", str(root), "--folds", "2", "--out", str(out), "--print_commands"]
    assert crossval.main(args) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 2 and all(" -m unetseg.analysis.crossval --plan " in c for c in commands)
    assert commands[0].endswith(f"--plan {out / 'plan.json'} --run fold_0 --threads 1")
    assert not (out / "fold_0").exists()  # nothing trained
    assert crossval.main(["--plan", str(out / "plan.json"), "--run", "fold_0"]) == 0  # what a job runs
    assert (out / "fold_0" / "result.json").is_file() and not (out / "fold_1").exists()
    assert crossval.main(args) == 0
    (remaining,) = capsys.readouterr().out.strip().splitlines()
    assert remaining.endswith("--run fold_1 --threads 1")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data.fold", "1"], r"--data.fold is set by the cross-validation \(each fold sets it\)"),
        (["--data.num_folds=4"], r"--data.num_folds is set by the cross-validation \(use --folds\)"),
        (["--folds", "7"], r"fold 0 is not a valid training run: .*fewer cases \(6\) than folds \(7\)"),
        (["--model.net.init_args.long_skip", "cat"], r"fold 0 is not a valid training run: .*'cat'"),
        (["--nsd_tolerance_mm", '{"a": 1.0}'], r"NSD tolerance \{'a': 1.0\}: .*missing class\(es\) \['b'\]"),
        (["--nsd_tolerance_mm", "-2"], r"--nsd_tolerance_mm=-2.0: expected a finite number >= 0"),
    ],
)
def test_bad_arguments_stop_before_training(tmp_path, capsys, extra, message):
    root = make_msd(tmp_path / "Task01_Toy", n_cases=N_CASES, n_test=0)
    out = tmp_path / "cv"
    assert crossval.main([*FAST, "--data.root", str(root), "--out", str(out), *extra]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists() or not list(out.glob("fold_*"))


def test_a_split_file_without_folds_is_refused(tmp_path, capsys):
    root = make_msd(tmp_path / "Task01_Toy", n_cases=4, n_test=0)
    split = tmp_path / "split.json"  # one fixed split: every fold would validate on the same cases
    split.write_text(json.dumps({"train": ["case_000", "case_001"], "val": ["case_002", "case_003"]}))
    args = [*FAST, "--data.root", str(root), "--data.split_file", str(split), "--folds", "2"]
    assert crossval.main([*args, "--out", str(tmp_path / "cv")]) == 2
    assert "case case_002 is a validation case of folds 0 and 1" in capsys.readouterr().err


def test_the_built_in_data_has_no_cases_to_split(tmp_path, capsys):
    assert crossval.main([*FAST, "--folds", "2", "--out", str(tmp_path / "cv")]) == 2
    assert "fold 0: --data.root is required" in capsys.readouterr().err


@pytest.mark.slow
def test_parallel_folds_in_subprocesses(tmp_path):
    root = make_msd(tmp_path / "Task01_Toy", n_cases=4, n_test=0)
    out = tmp_path / "cv"
    args = [
        *FAST,
        "--data.root",
        str(root),
        "--folds",
        "2",
        "--out",
        str(out),
        "--jobs",
        "2",
        "--threads",
        "1",
    ]
    assert crossval.main(args) == 0
    for k in range(2):
        assert (out / f"fold_{k}" / "result.json").is_file()
        assert "trained" in (out / "logs" / f"fold_{k}.log").read_text()
    assert len(_read_csv(out / "oof" / "per_case.csv")) == 4 * 2
    assert (out / "postprocessing.json").is_file()

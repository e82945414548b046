"""The worked real study (benchmarks/real_study.py) end to end on the real-MRI cut-out with a few steps: the
cross-validation, the ensemble's test masks with and without postprocessing, and the tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("nilearn")

from benchmarks import real_study  # noqa: E402

TINY = [
    "--trainer.max_steps",
    "4",
    "--data.batches_per_epoch",
    "2",
    "--model.net.init_args.channels",
    "[4, 8, 16]",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("study")
    assert real_study.main(["--workdir", str(workdir), "--cutout", "--jobs", "1", *TINY]) == 0
    return workdir


def test_the_study_writes_its_figures_and_tables(study: Path) -> None:
    figures = json.loads((study / "study.json").read_text())
    assert figures["dataset"]["test_ids"] == ["mni_002"]  # the cut-out's held-out slab
    assert [f["global_steps"] for f in figures["folds"]] == [4, 4, 4]
    assert set(figures["seconds"]) == {*real_study.STAGES, "total"}
    assert all(s >= 0 for s in figures["seconds"].values())
    assert figures["seconds"]["total"] == pytest.approx(sum(figures["seconds"][s] for s in real_study.STAGES))
    assert set(figures["cpu_seconds"]) == set(figures["seconds"]) and figures["cpu_seconds"]["crossval"] > 0
    assert figures["oof"]["num_cases"] == 5  # every slab but the test slab, each predicted out of fold
    for variant in real_study.VARIANTS:
        per_class = figures["test"][variant]["per_class"]
        assert set(per_class) == set(real_study.real_mri.CLASS_NAMES[1:])
        for stats in per_class.values():
            for metric in ("dice", "nsd"):
                assert stats[metric]["mean"] is None or 0.0 <= stats[metric]["mean"] <= 1.0
    table = (study / "study.md").read_text()
    assert (
        "| **total** |" in table
        and "| ventricles |" in table
        and "Postprocessing decided out of fold" in table
    )
    assert table == real_study.markdown(figures)


def test_the_ensemble_masks_are_evaluated_against_the_labels(study: Path) -> None:
    data, figures = study / "data", json.loads((study / "study.json").read_text())
    postprocessing = json.loads((study / "cv" / "postprocessing.json").read_text())
    assert "dice_before" in postprocessing and "dice_after" in postprocessing
    label = np.asarray(nib.load(data / "labelsTr" / "mni_002.nii.gz").dataobj)
    for variant in real_study.VARIANTS:
        mask_img = nib.load(study / "test" / variant / "mni_002.nii.gz")
        mask = np.asarray(mask_img.dataobj)
        assert mask.shape == label.shape and set(np.unique(mask)) <= set(range(5))
        assert np.allclose(mask_img.affine, nib.load(data / "imagesTr" / "mni_002.nii.gz").affine)
        with (study / "test" / variant / "per_case.csv").open() as f:
            rows = {r["class"]: r for r in csv.DictReader(f)}
        for c, name in enumerate(real_study.real_mri.CLASS_NAMES[1:], start=1):  # recomputed from the files
            ref, pred = label == c, mask == c
            expected = 2 * np.sum(ref & pred) / (ref.sum() + pred.sum()) if ref.any() or pred.any() else None
            got = figures["test"][variant]["global_dice"][name]
            if expected is None:  # the class is in neither: undefined
                assert got is None
                continue
            assert got == pytest.approx(expected) and float(rows[name]["dice"]) == pytest.approx(expected)
    commands = figures["commands"]["predict"]
    assert "--postprocessing" in commands["raw"] and "--postprocessing" not in commands["postprocessed"]


def test_a_second_run_in_the_same_workdir_needs_force(
    study: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert real_study.main(["--workdir", str(study), "--cutout", *TINY]) == 2
    assert "--force" in capsys.readouterr().err

"""The real-MRI dataset from the MNI152 template (benchmarks/real_mri.py) and the MONAI reference loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("nilearn")

from benchmarks import real_mri  # noqa: E402
from benchmarks.reference_loop import run_reference  # noqa: E402
from unetseg.data.formats import detect_layout, validate  # noqa: E402
from unetseg.data.splits import read_split_file  # noqa: E402

FILES_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


@pytest.fixture(scope="module")
def cutout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return real_mri.build_cutout(tmp_path_factory.mktemp("cutout") / "mri")


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return real_mri.build_dataset(tmp_path_factory.mktemp("full") / "mri", spacing=2, slab=6)


@pytest.fixture(scope="module")
def template_t1() -> nib.Nifti1Image:
    """The 1 mm T1 template, read straight from the nilearn wheel (not through the module under test)."""
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    return nib.load(Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / FILES_T1)


def _labels(root: Path, ids: list[str]) -> list[np.ndarray]:
    return [np.asarray(nib.load(root / "labelsTr" / f"{i}.nii.gz").dataobj) for i in ids]


def _case_ids(root: Path) -> list[str]:
    return [
        Path(e["image"]).name[: -len(".nii.gz")]
        for e in json.loads((root / "dataset.json").read_text())["training"]
    ]


def test_cutout_is_a_valid_msd_dataset_with_every_class_in_training(cutout: Path) -> None:
    spec = validate(detect_layout(cutout), check_data=True)
    assert spec.layout == "msd" and spec.in_channels == 1 and spec.spatial_dims == 3
    assert spec.class_names == ["background", "csf", "grey_matter", "white_matter", "ventricles"]
    assert len(spec.cases_train) == 6
    split = read_split_file(cutout / "splits.json", [c.case_id for c in spec.cases_train])
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(
        c.case_id for c in spec.cases_train
    )
    assert split["val"] and split["test"]
    train = _labels(cutout, split["train"])
    assert all(lab.shape == (32, 40, 3) and lab.dtype == np.uint8 for lab in train)
    assert set(np.unique(np.concatenate([lab.ravel() for lab in train]))) == {0, 1, 2, 3, 4}
    test = np.concatenate([lab.ravel() for lab in _labels(cutout, split["test"])])
    assert set(np.unique(test)) == {0, 1, 2, 3, 4}  # the reference loop's Dice is defined for every class
    image = nib.load(cutout / "imagesTr" / "mni_000.nii.gz")
    assert image.get_data_dtype() == np.float32 and np.isfinite(image.get_fdata()).all()


def test_builds_are_deterministic(cutout: Path, tmp_path: Path) -> None:
    again = real_mri.build_cutout(tmp_path / "again")
    names = sorted(p.relative_to(cutout) for p in cutout.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in names:
        assert (cutout / name).read_bytes() == (again / name).read_bytes(), name
    with pytest.raises(FileExistsError, match="force"):
        real_mri.build_cutout(again)
    real_mri.build_cutout(again, force=True)
    assert (again / "imagesTr" / "mni_005.nii.gz").read_bytes() == (
        cutout / "imagesTr/mni_005.nii.gz"
    ).read_bytes()


def test_full_build_rare_class_statistics(full: Path) -> None:
    stats = real_mri.dataset_stats(full)
    assert stats["cases"] == 13 and stats["case_shapes"] == [(75, 93, 6)] and stats["axial_slices"] == 78
    assert stats["cases_per_split"] == {"train": 8, "val": 2, "test": 3}
    classes = stats["classes"]
    assert all(c["voxels"] > 0 for c in classes.values())
    vent = classes["ventricles"]
    assert 0.002 < vent["fraction_of_foreground"] < 0.03
    assert 0 < vent["slice_fraction"] < 0.30
    assert all(n > 0 for n in vent["slices_per_split"].values())  # rare class in train, val and test
    for name in ("csf", "grey_matter", "white_matter"):  # the common classes are common
        assert classes[name]["fraction_of_foreground"] > 0.05 and classes[name]["slice_fraction"] > 0.8
    validate(detect_layout(full), check_data=False)


def _expected_t1(template: nib.Nifti1Image, world: np.ndarray, factor: int) -> float:
    """Mean of the 1 mm template over the block whose centre is ``world`` (block averaging by ``factor``)."""
    centre = (np.linalg.inv(template.affine) @ np.r_[world, 1.0])[:3]
    lo = np.round(centre - (factor - 1) / 2).astype(int)
    assert np.allclose(lo + (factor - 1) / 2, centre)  # a block centre falls on the template grid
    data = np.asarray(template.dataobj)
    return float(data[lo[0] : lo[0] + factor, lo[1] : lo[1] + factor, lo[2] : lo[2] + factor].mean())


@pytest.mark.parametrize(("which", "case", "factor"), [("full", "mni_007", 2), ("cutout", "mni_002", 3)])
def test_affines_keep_world_coordinates(which, case, factor, request, template_t1) -> None:
    root = request.getfixturevalue(which)
    img = nib.load(root / "imagesTr" / f"{case}.nii.gz")
    label = nib.load(root / "labelsTr" / f"{case}.nii.gz")
    assert np.allclose(img.affine, label.affine)
    assert np.allclose(np.abs(np.diag(img.affine)[:3]), factor)
    data = img.get_fdata()
    rng = np.random.default_rng(0)
    for ijk in [np.array(data.shape) // 2, *(rng.integers(0, data.shape) for _ in range(20))]:
        world = (img.affine @ np.r_[ijk, 1.0])[:3]
        assert data[tuple(ijk)] == pytest.approx(_expected_t1(template_t1, world, factor), abs=1e-3)


def test_labels_are_anatomical(full: Path) -> None:
    """Ventricles near MNI (0, -15, 15) mm; T1: CSF and ventricles < grey < white matter: labels fit image."""
    sums: dict[int, list[float]] = {c: [] for c in range(5)}
    vent_world = []
    for case_id in _case_ids(full):
        img = nib.load(full / "imagesTr" / f"{case_id}.nii.gz")
        lab = np.asarray(nib.load(full / "labelsTr" / f"{case_id}.nii.gz").dataobj)
        data = img.get_fdata()
        for c in sums:
            sums[c].extend(data[lab == c].tolist())
        idx = np.argwhere(lab == 4)
        if len(idx):
            vent_world.append((img.affine @ np.c_[idx, np.ones(len(idx))].T)[:3].T)
    centroid = np.concatenate(vent_world).mean(axis=0)
    assert abs(centroid[0]) < 3 and -25 < centroid[1] < -5 and 5 < centroid[2] < 25, centroid
    mean = {c: np.mean(v) for c, v in sums.items()}
    assert max(mean[1], mean[4]) < mean[2] < mean[3]  # T1-weighted: CSF dark, white matter bright


def test_stats_cli(full: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert real_mri.main(["stats", str(full)]) == 0
    out = capsys.readouterr().out
    assert "ventricles" in out and "13 cases" in out


def test_missing_nilearn_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = real_mri.importlib.util.find_spec
    monkeypatch.setattr(
        real_mri.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "nilearn" else find_spec(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install nilearn"):
        real_mri.template_folder()


def test_reference_loop_runs_steps(cutout: Path) -> None:
    result = run_reference(cutout, steps=3, seed=0, threads=1)
    assert result["steps"] == 3 and result["cases"] == {"train": 4, "val": 1, "test": 1}
    assert set(result["dice"]) == {"csf", "grey_matter", "white_matter", "ventricles"}
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in result["dice"].values())
    assert math.isfinite(result["final_loss"]) and result["train_seconds"] <= result["total_seconds"]
    assert result["mean_dice"] == pytest.approx(np.mean(list(result["dice"].values())))

"""Splits by case (k-fold, split files, held-out test) and intensity normalizations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests._datafiles import make_folder2d, make_msd, make_nnunet, volume_label
from unetseg.data.cases import CaseLoader
from unetseg.data.datasets import SliceDataset2D
from unetseg.data.formats import detect_layout
from unetseg.data.normalize import (
    DEFAULT_CT_WINDOW,
    CTWindow,
    MinMax,
    Percentile,
    ScaleRGB,
    ZScore,
    build_normalization,
)
from unetseg.data.splits import kfold_split, make_splits

IDS = [f"case_{i:02d}" for i in range(23)]

# ---------------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("num_folds", [2, 5, 23])
def test_kfold_partitions_the_cases(num_folds):
    vals = []
    for fold in range(num_folds):
        train, val = kfold_split(IDS, num_folds, fold, seed=3)
        assert not set(train) & set(val)
        assert sorted(train + val) == sorted(IDS)
        vals.append(val)
    flat = [i for v in vals for i in v]
    assert sorted(flat) == sorted(IDS)  # every case validated exactly once
    sizes = [len(v) for v in vals]
    assert max(sizes) - min(sizes) <= 1


def test_kfold_is_seeded():
    assert kfold_split(IDS, 5, 2, seed=7) == kfold_split(IDS, 5, 2, seed=7)
    assert kfold_split(IDS, 5, 2, seed=7)[1] != kfold_split(IDS, 5, 2, seed=8)[1]
    # the order of the input ids does not matter (they are sorted before shuffling)
    assert kfold_split(IDS[::-1], 5, 2, seed=7) == kfold_split(IDS, 5, 2, seed=7)


@pytest.mark.parametrize(
    ("ids", "num_folds", "fold", "message"),
    [
        (IDS[:3], 5, 0, r"fewer cases \(3\) than folds \(5\)"),
        (IDS, 5, 5, r"fold must be in 0\.\.4"),
        (IDS, 1, 0, "num_folds must be >= 2"),
        (["a", "a", "b"], 2, 0, r"duplicate case ids: \['a'\]"),
    ],
)
def test_kfold_bad_arguments(ids, num_folds, fold, message):
    with pytest.raises(ValueError, match=message):
        kfold_split(ids, num_folds, fold)


def test_make_splits_by_case_with_dataset_test_split(tmp_path):
    spec = detect_layout(make_msd(tmp_path / "ds", n_cases=6, n_test=2))
    splits = make_splits(spec, fold=1, num_folds=3, seed=0)
    ids = splits.ids()
    assert ids["test"] == ["case_006", "case_007"]  # imagesTs
    assert len(ids["val"]) == 2 and len(ids["train"]) == 4
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not set(ids[a]) & set(ids[b])
    assert make_splits(spec, fold=1, num_folds=3, seed=0).ids() == ids


def test_slices_of_one_case_never_cross_splits(tmp_path):
    spec = detect_layout(make_msd(tmp_path / "ds", n_cases=6))
    splits = make_splits(spec, fold=0, num_folds=3, seed=1)
    loader = CaseLoader(spec)
    train = SliceDataset2D(splits.train, loader, axis=2)
    val = SliceDataset2D(splits.val, loader, axis=2)
    train_cases = {train.cases[i].case_id for i in train.case_index}
    val_cases = {val.cases[i].case_id for i in val.case_index}
    assert train_cases == set(splits.ids()["train"]) and val_cases == set(splits.ids()["val"])
    assert not train_cases & val_cases
    assert len(train) == 4 * 10 and len(val) == 2 * 10  # every slice of each case, along axis 2 (size 10)


def test_held_out_test_ids_leave_the_pool(tmp_path):
    spec = detect_layout(make_msd(tmp_path / "ds", n_cases=6, n_test=0))
    splits = make_splits(spec, fold=0, num_folds=2, test_ids=["case_002"])
    assert splits.ids()["test"] == ["case_002"]
    assert "case_002" not in splits.ids()["train"] + splits.ids()["val"]
    assert len(splits.train) + len(splits.val) == 5
    with pytest.raises(ValueError, match=r"unknown held-out test case id\(s\) \['nope'\]"):
        make_splits(spec, test_ids=["nope"])


def test_split_file(tmp_path):
    spec = detect_layout(make_nnunet(tmp_path / "ds", n_cases=4, n_test=1))
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["pt000", "pt001"], "val": ["pt002"], "test": ["pt003"]}))
    splits = make_splits(spec, split_file=path)
    assert splits.ids() == {"train": ["pt000", "pt001"], "val": ["pt002"], "test": ["pt003", "pt004"]}


def test_nnunet_splits_final_list_is_indexed_by_fold(tmp_path):
    spec = detect_layout(make_nnunet(tmp_path / "ds", n_cases=4, n_test=0))
    path = tmp_path / "splits_final.json"
    path.write_text(
        json.dumps(
            [
                {"train": ["pt000", "pt001"], "val": ["pt002", "pt003"]},
                {"train": ["pt002", "pt003"], "val": ["pt000", "pt001"]},
            ]
        )
    )
    assert make_splits(spec, fold=1, split_file=path).ids()["val"] == ["pt000", "pt001"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            {"train": ["pt000", "ghost"], "val": ["pt001", "phantom"]},
            r"unknown case id\(s\) in 'train': \['ghost'\]",
        ),
        ({"train": ["pt000", "pt001"], "val": ["pt001"]}, "'pt001' appears in both 'train' and 'val'"),
        ({"train": ["pt000"]}, "expected an object with keys 'train' and 'val'"),
        ({"train": ["pt000"], "val": [], "holdout": []}, r"unknown key\(s\) \['holdout'\]"),
        ("{not json", "is not valid JSON"),
    ],
)
def test_split_file_errors_name_the_problem(tmp_path, content, message):
    spec = detect_layout(make_nnunet(tmp_path / "ds", n_cases=3, n_test=0))
    path = tmp_path / "split.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=message) as info:
        make_splits(spec, split_file=path)
    assert str(path) in str(info.value)


def test_missing_split_file(tmp_path):
    spec = detect_layout(make_nnunet(tmp_path / "ds", n_cases=3, n_test=0))
    with pytest.raises(FileNotFoundError, match="split file not found"):
        make_splits(spec, split_file=tmp_path / "nope.json")


def test_folder_subsets_give_predefined_val_unless_a_fold_is_asked(tmp_path):
    spec = detect_layout(make_folder2d(tmp_path / "ds", n=3, subsets=("train", "val", "test")))
    predefined = make_splits(spec, fold=None)
    assert predefined.ids() == {
        "train": ["img000", "img001", "img002"],
        "val": ["img003", "img004", "img005"],
        "test": ["img006", "img007", "img008"],
    }
    kfold = make_splits(spec, fold=0, num_folds=3).ids()
    assert sorted(kfold["train"] + kfold["val"]) == [f"img{i:03d}" for i in range(6)]
    assert len(kfold["val"]) == 2 and kfold["test"] == predefined.ids()["test"]


def test_fewer_cases_than_folds_from_make_splits(tmp_path):
    spec = detect_layout(make_msd(tmp_path / "ds", n_cases=3))
    with pytest.raises(ValueError, match=r"fewer cases \(3\) than folds \(5\)"):
        make_splits(spec, fold=0, num_folds=5)


# ------------------------------------------------------------------------------------------- normalization

RNG = np.random.default_rng(0)
MR = (RNG.normal(300.0, 40.0, (12, 10, 8))).astype(np.float32)


def test_zscore_gives_zero_mean_unit_std():
    out = ZScore()(MR)
    assert out.dtype == np.float32 and out.shape == MR.shape
    assert abs(out.mean()) < 1e-4 and abs(out.std() - 1) < 1e-4


def test_zscore_nonzero_keeps_background_zero_and_standardizes_foreground():
    x = np.zeros((20, 20), np.float32)
    x[5:15, 5:15] = RNG.normal(500.0, 20.0, (10, 10))
    out = ZScore(nonzero=True)(x)
    assert np.all(out[x == 0] == 0)
    inside = out[x != 0]
    assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-4
    # over all voxels, the z-score would move the background away from 0
    assert ZScore()(x)[0, 0] < -0.5
    # background="scale": the same foreground statistics, applied to the background too (darkest value)
    scaled = ZScore(nonzero=True, background="scale")(x)
    assert scaled[x != 0] == pytest.approx(inside, abs=1e-5)
    expected = (0 - x[x != 0].mean()) / x[x != 0].std()
    assert np.all(scaled[x == 0] == pytest.approx(expected, rel=1e-4)) and expected < inside.min()


def test_zscore_nonzero_makes_tissue_intensities_agree_across_cases_with_different_background():
    # two cases of the same tissue mix, one with twice as much zero background: the whole-case z-score gives
    # the same tissue different values; the non-zero statistics (either background mode) do not
    tissue = RNG.normal(500.0, 20.0, (10, 10)).astype(np.float32)
    small, large = np.zeros((20, 10), np.float32), np.zeros((40, 10), np.float32)
    small[:10], large[:10] = tissue, tissue
    assert abs(ZScore()(small)[:10].mean() - ZScore()(large)[:10].mean()) > 0.3
    for background in ("zero", "scale"):
        norm = ZScore(nonzero=True, background=background)
        assert norm(small)[:10] == pytest.approx(norm(large)[:10], abs=1e-5)


def test_ct_window_unit_clips_and_scales():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0], np.float32)
    out = CTWindow()(hu)
    assert DEFAULT_CT_WINDOW == (-160.0, 240.0)
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])


def test_ct_window_zscore_mode_uses_given_stats_or_the_clipped_case():
    hu = np.array([-1000.0, 0.0, 100.0, 3000.0], np.float32)
    given = CTWindow(window=(-100, 200), mode="zscore", mean=50.0, std=25.0)(hu)
    assert given.tolist() == pytest.approx(
        [(-100 - 50) / 25, (0 - 50) / 25, (100 - 50) / 25, (200 - 50) / 25]
    )
    own = CTWindow(window=(-100, 200), mode="zscore")(hu)
    assert abs(own.mean()) < 1e-5 and abs(own.std() - 1) < 1e-5


def test_percentile_clips_outliers_then_standardizes():
    x = RNG.normal(0.0, 1.0, 10_000).astype(np.float32)
    x[0] = 1e6
    out = Percentile(0.5, 99.5)(x)
    assert out.max() < 5  # the outlier was clipped to the 99.5th percentile
    assert abs(out.mean()) < 1e-3 and abs(out.std() - 1) < 1e-3
    assert ZScore()(x).max() > 90  # without clipping it dominates


def test_minmax_and_rgb():
    x = np.array([10.0, 20.0, 30.0], np.float32)
    assert MinMax()(x).tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert ScaleRGB()(np.array([0, 51, 255], np.uint8)).tolist() == pytest.approx([0.0, 0.2, 1.0])


def test_default_normalization_follows_the_modality(tmp_path):
    spec = detect_layout(make_nnunet(tmp_path / "nn", channels=("CT", "T2")))
    assert spec.default_normalization == ["ct", "zscore"]
    norm = build_normalization(None, spec)
    assert isinstance(norm.normalizers[0], CTWindow) and norm.normalizers[0].window == DEFAULT_CT_WINDOW
    assert isinstance(norm.normalizers[1], ZScore)
    assert detect_layout(make_msd(tmp_path / "msd", modalities=("MRI",))).default_normalization == ["zscore"]
    assert detect_layout(make_folder2d(tmp_path / "f2")).default_normalization == ["rgb"] * 3


def test_normalization_config_forms():
    norm = build_normalization(
        [{"name": "ct", "window": [-100, 300]}, {"percentile": {"upper": 99.0}}], in_channels=2
    )
    assert norm.normalizers[0].window == (-100.0, 300.0)
    assert norm.normalizers[1].upper == 99.0
    image = np.stack([np.full((4, 4), 100.0), RNG.normal(0, 1, (4, 4))]).astype(np.float32)
    out = norm(image)
    assert out.shape == image.shape and out.dtype == np.float32
    assert out[0].ravel().tolist() == pytest.approx([0.5] * 16)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("histogram", r"unknown normalization 'histogram'; expected one of \['zscore', 'ct'"),
        ({"name": "zscore", "bogus": 1}, "normalization 'zscore': invalid arguments"),
        ({"name": "zscore", "nonzero": True, "background": "mean"}, "background must be 'zero' or 'scale'"),
        (["zscore"], r"1 entries; expected one per input channel \(2\)"),
        ({"name": "ct", "window": [300, -100]}, "lo < hi"),
    ],
)
def test_normalization_errors(config, message):
    with pytest.raises(ValueError, match=message):
        build_normalization(config, in_channels=2)


def test_ct_auto_window_from_foreground_percentiles(tmp_path):
    spec = detect_layout(make_msd(tmp_path / "ds", modalities=("CT",)))
    # foreground intensities: class 1 ~ 150 HU, class 2 ~ 200 HU (unit noise), background ~ 100 HU
    norm = build_normalization({"name": "ct", "window": "auto", "mode": "zscore"}, spec)
    ct = norm.normalizers[0]
    lo, hi = ct.window
    assert 145 < lo < 150 and 200 < hi < 205
    assert 150 < ct.mean < 200 and ct.std > 10
    loaded = CaseLoader(spec, normalization={"name": "ct", "window": "auto"}).load(spec.cases_train[0])
    label = volume_label()
    assert np.all(loaded.image[0][label == 0] == 0.0)  # background (~100 HU) is below lo: clipped to 0
    assert 0.9 < loaded.image[0][label == 2].mean() <= 1.0  # class 2 (~200 HU) sits at the top of the window
    assert 0.0 <= loaded.image.min() and loaded.image.max() <= 1.0


def test_case_loader_normalizes_each_case(tmp_path):
    spec = detect_layout(make_nnunet(tmp_path / "ds", channels=("T2", "ADC")))
    image = CaseLoader(spec).load(spec.cases_train[0]).image
    assert image.dtype == np.float32 and image.shape[0] == 2
    assert np.allclose(image.reshape(2, -1).mean(axis=1), 0, atol=1e-4)
    assert np.allclose(image.reshape(2, -1).std(axis=1), 1, atol=1e-4)

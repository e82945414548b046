"""Synthetic data and SegmentationDataModule: determinism, splits, class geometry, loaders, bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from unetseg.data import CLASS_NAMES, SegmentationDataModule, SyntheticSegmentation

BACKGROUND, ORGAN, LESION, VESSEL = range(4)


def _items(ds: SyntheticSegmentation, indices) -> list[dict[str, torch.Tensor]]:
    return [ds[i] for i in indices]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


# ---------------------------------------------------------------- SyntheticSegmentation


@pytest.mark.parametrize(
    "spatial_dims, spatial_size, expected",
    [(2, 32, (32, 32)), (2, (40, 56), (40, 56)), (3, 16, (16, 16, 16)), (3, (24, 16, 20), (24, 16, 20))],
)
def test_item_shapes_dtypes_and_ranges(spatial_dims, spatial_size, expected):
    ds = SyntheticSegmentation(3, spatial_size, spatial_dims=spatial_dims)
    assert len(ds) == 3
    for item in _items(ds, range(3)):
        assert set(item) == {"image", "label"}
        assert item["image"].dtype == torch.float32 and item["image"].shape == (1, *expected)
        assert item["label"].dtype == torch.int64 and item["label"].shape == expected
        assert 0 <= int(item["label"].min()) and int(item["label"].max()) < len(CLASS_NAMES)
        assert torch.isfinite(item["image"]).all()
        # standardized per image
        assert abs(float(item["image"].mean())) < 1e-4
        assert float(item["image"].std()) == pytest.approx(1.0, abs=1e-2)


@pytest.mark.parametrize("spatial_dims, size", [(2, 48), (3, 20)])
def test_same_seed_same_data_different_seed_different(spatial_dims, size):
    a = _items(SyntheticSegmentation(4, size, spatial_dims, seed=0), range(4))
    b = _items(SyntheticSegmentation(4, size, spatial_dims, seed=0), range(4))
    c = _items(SyntheticSegmentation(4, size, spatial_dims, seed=1), range(4))
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    assert not any(torch.equal(x["image"], z["image"]) for x, z in zip(a, c, strict=True))
    assert not any(torch.equal(x["label"], z["label"]) for x, z in zip(a, c, strict=True))
    # distinct samples within one dataset, too
    assert not torch.equal(a[0]["image"], a[1]["image"])


def test_item_independent_of_access_order():
    first = SyntheticSegmentation(8, 32)[5]
    ds = SyntheticSegmentation(8, 32)
    for i in [7, 0, 3, 5, 1]:  # touch other items (and item 5) before
        ds[i]
    assert _same(ds[5], first)
    assert _same(ds[-3], first)


def test_index_out_of_range():
    ds = SyntheticSegmentation(4, 16)
    with pytest.raises(IndexError, match="4"):
        ds[4]
    with pytest.raises(IndexError):
        ds[-5]


def test_splits_draw_different_samples():
    images = {
        split: {SyntheticSegmentation(6, 32, split=split)[i]["image"].numpy().tobytes() for i in range(6)}
        for split in ("train", "val", "test")
    }
    assert all(len(v) == 6 for v in images.values())
    assert not images["train"] & images["val"]
    assert not images["train"] & images["test"]
    assert not images["val"] & images["test"]


@pytest.mark.parametrize("spatial_dims, size, n", [(2, 96, 24), (3, 48, 6)])
def test_all_classes_present_and_vessel_thin(spatial_dims, size, n):
    ds = SyntheticSegmentation(n, size, spatial_dims)
    structure = np.ones((3,) * spatial_dims, dtype=bool)
    with_all_classes = 0
    for item in _items(ds, range(n)):
        label = item["label"].numpy()
        with_all_classes += set(np.unique(label)) == {BACKGROUND, ORGAN, LESION, VESSEL}
        vessel, organ = label == VESSEL, np.isin(label, (ORGAN, LESION))
        # erosion by a 3^d cube removes (almost) all of a 1-3 px wide structure, but not most of the organ
        assert ndimage.binary_erosion(vessel, structure).sum() < 0.3 * vessel.sum()
        assert ndimage.binary_erosion(organ, structure).sum() > 0.5 * organ.sum()
        # the organ is large, lesions and vessel are small
        assert organ.mean() > 0.08
        assert (label == LESION).sum() < 0.5 * organ.sum()
        assert vessel.mean() < 0.05
    assert with_all_classes >= 0.9 * n


def test_intensities_lesion_close_to_organ_vessel_bright():
    ds = SyntheticSegmentation(24, 96)
    lesion_closer = 0
    for item in _items(ds, range(len(ds))):
        image, label = item["image"][0].numpy(), item["label"].numpy()
        mean = {c: image[label == c].mean() for c in np.unique(label)}
        if LESION not in mean:
            continue
        lesion_gap, organ_gap = abs(mean[LESION] - mean[ORGAN]), abs(mean[ORGAN] - mean[BACKGROUND])
        assert lesion_gap > 0.1  # visible: above a tenth of the image std
        lesion_closer += lesion_gap < organ_gap
        assert mean[VESSEL] > mean[ORGAN] > mean[BACKGROUND]
    assert lesion_closer >= 0.9 * len(ds)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_samples": 2, "spatial_dims": 4}, "spatial_dims=4"),
        ({"num_samples": 2, "spatial_size": 0}, "spatial_size=0"),
        ({"num_samples": 2, "spatial_size": (32, 32, 32)}, r"spatial_size=\(32, 32, 32\)"),
        ({"num_samples": -1}, "num_samples=-1"),
        ({"num_samples": 2, "seed": -1}, "seed=-1"),
        ({"num_samples": 2, "split": "holdout"}, "split='holdout'"),
    ],
)
def test_dataset_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticSegmentation(**kwargs)


# ---------------------------------------------------------------- SegmentationDataModule


@pytest.mark.parametrize("spatial_dims, default_size", [(2, 96), (3, 48)])
def test_datamodule_properties_before_setup(spatial_dims, default_size):
    dm = SegmentationDataModule(spatial_dims=spatial_dims)
    assert dm.num_classes == 4 and dm.in_channels == 1 and dm.spatial_dims == spatial_dims
    assert dm.class_names == ["background", "organ", "lesion", "vessel"] == list(CLASS_NAMES)
    assert dm.spatial_size == (default_size,) * spatial_dims
    assert dm.datasets == {}  # nothing built at construction
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()


@pytest.mark.parametrize(
    "stage, built",
    [("fit", {"train", "val"}), ("validate", {"val"}), ("test", {"test"}), ("predict", {"test"}),
     (None, {"train", "val", "test"})],
)
def test_setup_builds_the_stage_splits(stage, built):
    dm = SegmentationDataModule(spatial_size=16, num_train=5, num_val=3, num_test=2)
    dm.setup(stage)
    assert set(dm.datasets) == built
    assert all(len(dm.datasets[s]) == {"train": 5, "val": 3, "test": 2}[s] for s in built)


def test_setup_rejects_unknown_stage():
    with pytest.raises(ValueError, match="stage='tune'"):
        SegmentationDataModule().setup("tune")


@pytest.mark.parametrize("spatial_dims, size", [(2, (24, 32)), (3, (16, 12, 8))])
def test_loaders_batch_shapes(spatial_dims, size):
    dm = SegmentationDataModule(spatial_dims=spatial_dims, spatial_size=size, num_train=10, num_val=5,
                                num_test=3, batch_size=4, persistent_workers=True)  # ignored with 0 workers
    dm.setup()
    train = list(dm.train_dataloader())
    assert [len(b["image"]) for b in train] == [4, 4, 2]  # drop_last=False
    for batch in train:
        assert batch["image"].shape[1:] == (1, *size) and batch["image"].dtype == torch.float32
        assert batch["label"].shape[1:] == size and batch["label"].dtype == torch.int64
    assert [len(b["label"]) for b in dm.val_dataloader()] == [4, 1]
    assert [len(b["label"]) for b in dm.test_dataloader()] == [3]


def test_val_test_predict_loaders_keep_dataset_order():
    dm = SegmentationDataModule(spatial_size=16, num_val=6, num_test=6, batch_size=6)
    dm.setup()
    for loader, split in [(dm.val_dataloader(), "val"), (dm.test_dataloader(), "test"),
                          (dm.predict_dataloader(), "test")]:
        batch = next(iter(loader))
        expected = torch.stack([dm.datasets[split][i]["image"] for i in range(6)])
        assert torch.equal(batch["image"], expected)


def _train_orders(seed: int, epochs: int = 1) -> list[list[int]]:
    """Dataset indices in the order the train loader yields them, one list per epoch (one loader)."""
    dm = SegmentationDataModule(spatial_size=16, num_train=24, batch_size=5, seed=seed)
    dm.setup("fit")
    index_of = {dm.datasets["train"][i]["image"].numpy().tobytes(): i for i in range(24)}
    loader = dm.train_dataloader()
    return [[index_of[image.numpy().tobytes()] for batch in loader for image in batch["image"]]
            for _ in range(epochs)]


def test_train_shuffle_is_seeded():
    first, second = _train_orders(seed=0, epochs=2)
    assert sorted(first) == list(range(24)) and first != list(range(24))  # every sample once, shuffled
    assert sorted(second) == list(range(24)) and first != second  # a new order every epoch
    assert _train_orders(seed=0, epochs=2) == [first, second]  # the same orders for the same seed
    assert _train_orders(seed=1)[0] != first


def test_datamodule_splits_disjoint():
    dm = SegmentationDataModule(spatial_size=24, num_train=12, num_val=6, num_test=6)
    dm.setup()
    seen = {s: {dm.datasets[s][i]["image"].numpy().tobytes() for i in range(len(dm.datasets[s]))}
            for s in ("train", "val", "test")}
    assert sum(len(v) for v in seen.values()) == len(set().union(*seen.values())) == 24


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spatial_dims": 1}, "spatial_dims=1"),
        ({"spatial_dims": 4}, "spatial_dims=4"),
        ({"spatial_size": 0}, "spatial_size=0"),
        ({"spatial_size": -8}, "spatial_size=-8"),
        ({"spatial_size": (64, 0)}, r"spatial_size=\(64, 0\)"),
        ({"spatial_size": (64, 64, 64)}, r"spatial_size=\(64, 64, 64\)"),  # 3 sizes for 2D
        ({"num_train": 0}, "num_train=0"),
        ({"num_val": -1}, "num_val=-1"),
        ({"num_test": 0}, "num_test=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"num_workers": -1}, "num_workers=-1"),
        ({"seed": -2}, "seed=-2"),
    ],
)
def test_datamodule_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SegmentationDataModule(**kwargs)


def test_root_missing_folder_is_a_value_error(tmp_path):
    missing = tmp_path / "no_such_dataset"
    dm = SegmentationDataModule(root=str(missing))  # construction reads nothing
    with pytest.raises(ValueError, match="no_such_dataset"):
        dm.setup("fit")


def test_root_empty_folder_is_a_value_error(tmp_path):
    dm = SegmentationDataModule(root=str(tmp_path))
    with pytest.raises(ValueError, match=f"dataset root is empty: {tmp_path}"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="empty"):
        _ = dm.class_names

"""Datasets over real files: 2D slices, 3D patches, whole volumes, the case loader and caches, laziness."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests._datafiles import FG_Z, SHAPE, affine, make_folder2d, make_msd, make_nnunet, write_nifti
from unetseg.data.cases import CaseLoader
from unetseg.data.datasets import (
    PatchDataset,
    SliceDataset2D,
    TrainingSlices2D,
    VolumeDataset,
    extract_window,
)
from unetseg.data.formats import detect_layout, validate
from unetseg.data.formats import io as formats_io
from unetseg.data.transforms import DEFAULT_AUGMENTATION_2D, DEFAULT_AUGMENTATION_3D, build_transform


@pytest.fixture
def msd(tmp_path):
    return validate(detect_layout(make_msd(tmp_path / "msd", n_cases=3, modalities=("T1", "T2"))))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_along_each_axis(msd, axis):
    ds = SliceDataset2D(msd.cases_train, CaseLoader(msd), axis=axis)
    other = [s for a, s in enumerate(SHAPE) if a != axis]
    assert len(ds) == 3 * SHAPE[axis]
    sample = ds[5]
    assert sample["image"].shape == (2, *other) and sample["image"].dtype == torch.float32
    assert sample["label"].shape == tuple(other) and sample["label"].dtype == torch.int64


def test_slice_is_the_volume_slice(msd):
    loader = CaseLoader(msd)
    ds = SliceDataset2D(msd.cases_train, loader, axis=2)
    index = SHAPE[2] + 4  # second case, slice 4
    loaded = loader.load(msd.cases_train[1])
    sample = ds[index]
    assert np.array_equal(sample["image"].numpy(), loaded.image[:, :, :, 4])
    assert np.array_equal(sample["label"].numpy(), loaded.label[:, :, 4])


def test_patch_size_pads_and_crops_slices(msd):
    ds = SliceDataset2D(msd.cases_train, CaseLoader(msd), axis=2, patch_size=(8, 20), crop="center")
    sample = ds[FG_Z[0]]
    assert sample["image"].shape == (2, 8, 20) and sample["label"].shape == (8, 20)
    # Y (12) is padded to 20 with 4 columns of background each side; X (16) is cropped to its centre 8 rows
    assert torch.all(sample["label"][:, :4] == 0) and torch.all(sample["label"][:, -4:] == 0)
    assert torch.all(sample["image"][:, :, :4] == 0)
    assert ds[3]["image"].equal(ds[3]["image"])  # center crop without transform: deterministic


def test_slice_dataset_with_augmentation_and_dataloader(msd):
    ds = TrainingSlices2D(
        msd.cases_train,
        CaseLoader(msd),
        axis=2,
        patch_size=(16, 16),
        transform=build_transform(DEFAULT_AUGMENTATION_2D, 2),
        oversample=1.0,
        batch_size=4,
    )
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 2, 16, 16) and batch["label"].shape == (4, 16, 16)
    assert set(batch["label"].unique().tolist()) <= {0, 1, 2}


def test_image_folder_dataset_resizes_and_crops(tmp_path):
    spec = validate(detect_layout(make_folder2d(tmp_path / "f", n=3)))
    loader = CaseLoader(spec)
    ds = SliceDataset2D(
        spec.cases_train,
        loader,
        resize=(40, 48),
        patch_size=(32, 32),
        transform=build_transform(DEFAULT_AUGMENTATION_2D, 2),
    )
    assert len(ds) == 3
    sample = ds[0]
    assert sample["image"].shape == (3, 32, 32) and sample["label"].shape == (32, 32)
    assert set(sample["label"].unique().tolist()) <= {0, 1}
    plain = SliceDataset2D(spec.cases_train, loader)[1]
    assert (
        plain["image"].shape == (3, 20, 24) and 0 <= plain["image"].min() and plain["image"].max() <= 1
    )  # /255


def test_patch_dataset_shapes_padding_and_batching(msd):
    loader = CaseLoader(msd)
    ds = PatchDataset(
        msd.cases_train,
        loader,
        patch_size=(8, 8, 8),
        samples_per_case=4,
        transform=build_transform(DEFAULT_AUGMENTATION_3D, 3),
    )
    assert len(ds) == 12
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 2, 8, 8, 8) and batch["label"].shape == (3, 8, 8, 8)
    big = PatchDataset(msd.cases_train, loader, patch_size=(20, 16, 12), oversample=0)
    sample = big[0]
    assert sample["image"].shape == (2, 20, 16, 12)
    assert int((sample["label"] > 0).sum()) == int(
        (loader.load(msd.cases_train[0]).label > 0).sum()
    )  # all inside
    with pytest.raises(ValueError, match="must have 3 values"):
        PatchDataset(msd.cases_train, loader, patch_size=(8, 8))


def _one_voxel_dataset(root, size=40):
    """An nnU-Net dataset with one case: a ``size``^3 volume whose only foreground is its centre voxel."""
    make_nnunet(root, n_cases=1, n_test=0, channels=("MR",), labels=("background", "dot"), shape=(4, 4, 4))
    label = np.zeros((size,) * 3, np.uint8)
    label[size // 2, size // 2, size // 2] = 1
    write_nifti(root / "labelsTr" / "pt000.nii.gz", label, affine())
    write_nifti(
        root / "imagesTr" / "pt000_0000.nii.gz", np.random.default_rng(0).normal(size=label.shape), affine()
    )
    return validate(detect_layout(root))


@pytest.mark.parametrize(("rate", "expected"), [(1 / 3, None), (0.0, None), (1.0, 1.0)])
def test_foreground_oversampling_rate(tmp_path, rate, expected):
    size, patch, n = 40, 8, 1500
    spec = _one_voxel_dataset(tmp_path / "dot", size)
    torch.manual_seed(0)
    ds = PatchDataset(
        spec.cases_train,
        CaseLoader(spec, cache="memory"),
        patch_size=(patch,) * 3,
        samples_per_case=n,
        oversample=rate,
        batch_size=3,  # rate 1/3: the last item of every 3 is forced onto the dot
    )
    hits = np.mean([bool(ds[i]["label"].any()) for i in range(n)])
    # a uniform start in [0, size - patch] puts the centre voxel inside the patch for `patch` values per axis
    p_random = (patch / (size - patch + 1)) ** 3
    expected = rate + (1 - rate) * p_random if expected is None else expected
    assert abs(hits - expected) < 0.05, (hits, expected)


def test_volume_dataset_whole_crop_and_pad(msd):
    loader = CaseLoader(msd)
    whole = VolumeDataset(msd.cases_train, loader)
    sample = whole[1]
    assert sample["image"].shape == (2, *SHAPE) and sample["case_id"] == "case_001"
    assert sample["spacing"].tolist() == [1.0, 1.0, 2.0]  # the affine() of _datafiles
    crop = VolumeDataset(msd.cases_train, loader, crop_size=(8, 8, 8))[1]
    loaded = loader.load(msd.cases_train[1])
    assert np.array_equal(crop["label"].numpy(), loaded.label[4:12, 2:10, 1:9])  # (dim - 8) // 2 offsets
    test = make_msd(msd.root.parent / "with_test", n_cases=2, n_test=1)
    spec = detect_layout(test)
    unlabelled = VolumeDataset(spec.cases_test, CaseLoader(spec))[0]
    assert set(unlabelled) == {"image", "case_id", "spacing"}


def test_extract_window_pads_outside():
    a = np.arange(12).reshape(1, 3, 4)
    out = extract_window(a, (-1, 2), (3, 3), fill=-1)
    assert out.tolist() == [[[-1, -1, -1], [2, 3, -1], [6, 7, -1]]]


def test_resampling_to_target_spacing(tmp_path):
    spec = validate(detect_layout(make_msd(tmp_path / "m", n_cases=2)))  # spacing (1, 1, 2)
    loader = CaseLoader(spec, target_spacing=(1.0, 1.0, 1.0))
    assert loader.spatial_shape(spec.cases_train[0]) == (16, 12, 20)
    loaded = loader.load(spec.cases_train[0])
    assert loaded.image.shape == (1, 16, 12, 20) and loaded.label.shape == (16, 12, 20)
    assert loaded.spacing == (1.0, 1.0, 1.0)
    assert set(np.unique(loaded.label).tolist()) == {0, 1, 2}
    # nearest-neighbour: z-slice k of the original becomes slices 2k and 2k + 1
    original = CaseLoader(spec).load(spec.cases_train[0]).label
    assert np.array_equal(loaded.label[:, :, ::2], original) and np.array_equal(
        loaded.label[:, :, 1::2], original
    )
    assert len(SliceDataset2D(spec.cases_train, loader, axis=2)) == 2 * 20
    with pytest.raises(ValueError, match="must have 3 values"):
        CaseLoader(spec, target_spacing=(1.0, 1.0))


def test_disk_cache_writes_arrays_and_serves_them_without_the_source(tmp_path, monkeypatch):
    spec = validate(detect_layout(make_msd(tmp_path / "m", n_cases=2)))
    cache_dir = tmp_path / "cache"
    first = CaseLoader(spec, cache="disk", cache_dir=cache_dir).load(spec.cases_train[0])
    assert len(list(cache_dir.glob("case_000-*_image.npy"))) == 1
    reference = CaseLoader(spec).load(spec.cases_train[0])
    assert np.array_equal(first.image, reference.image) and np.array_equal(first.label, reference.label)

    def forbidden(*args, **kwargs):
        raise AssertionError("source file read despite the disk cache")

    monkeypatch.setattr("unetseg.data.cases.read_image", forbidden)
    again = CaseLoader(spec, cache="disk", cache_dir=cache_dir).load(spec.cases_train[0])
    assert isinstance(again.image, np.memmap) and np.array_equal(again.image, reference.image)
    with pytest.raises(ValueError, match="cache must be one of"):
        CaseLoader(spec, cache="ssd")
    with pytest.raises(ValueError, match="needs cache_dir"):
        CaseLoader(spec, cache="disk")


# ----------------------------------------------------------------------------------------------- laziness


def _big_arrays(obj, seen=None, depth=0) -> list[np.ndarray]:
    """ndarrays with more than 1000 elements reachable from ``obj`` through attributes and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj] if obj.size > 1000 else []
    children = []
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, list | tuple | set):
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    return [a for child in children for a in _big_arrays(child, seen, depth + 1)]


def test_lazy_datasets_hold_no_arrays_after_construction(msd, monkeypatch):
    reads = []
    original = formats_io.read_array
    monkeypatch.setattr(formats_io, "read_array", lambda *a, **k: reads.append(a[0]) or original(*a, **k))
    loader = CaseLoader(msd)
    datasets = [
        SliceDataset2D(msd.cases_train, loader, axis=2, patch_size=(8, 8)),
        PatchDataset(msd.cases_train, loader, patch_size=(8, 8, 8)),
        VolumeDataset(msd.cases_train, loader),
    ]
    assert reads == []  # construction read headers only
    assert loader.cached_arrays() == 0
    assert all(_big_arrays(ds) == [] for ds in datasets)
    datasets[0][0]
    assert len(reads) > 0 and loader.cached_arrays() == 1  # only the most recent case is kept


def _memory_after_iterating(root, n_cases: int, cache: str) -> int:
    """Traced bytes still allocated after reading every slice of ``n_cases`` cases (dataset kept alive)."""
    spec = detect_layout(root)
    cases = spec.cases_train[:n_cases]
    gc.collect()
    tracemalloc.start()
    loader = CaseLoader(spec, cache=cache)
    ds = SliceDataset2D(cases, loader, axis=2)
    for i in range(len(ds)):
        ds[i]
    gc.collect()
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(ds) == n_cases * 16
    return current


def test_memory_stays_flat_with_more_cases_when_lazy(tmp_path):
    root = make_nnunet(tmp_path / "nn", n_cases=9, n_test=0, channels=("MR",), shape=(32, 32, 16))
    case_bytes = 32 * 32 * 16 * (4 + 8)  # float32 image + int64 label
    lazy_small = _memory_after_iterating(root, 3, "none")
    lazy_large = _memory_after_iterating(root, 9, "none")
    assert lazy_large - lazy_small < case_bytes, (lazy_small, lazy_large)
    cached_small = _memory_after_iterating(root, 3, "memory")
    cached_large = _memory_after_iterating(root, 9, "memory")
    assert cached_large - cached_small > 5 * case_bytes  # the check above would see a growing memory

"""Class-aware sampling: forced items per batch, class voxels, windows around them, rare-class rates."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests._datafiles import RARE_Z, SHAPE, make_msd, make_rare_msd
from unetseg.data import SegmentationDataModule
from unetseg.data.cases import CaseLoader
from unetseg.data.datasets import PatchDataset, TrainingSlices2D
from unetseg.data.formats import detect_layout, validate
from unetseg.data.sampling import BatchPlan, ClassLocations, window_starts

RARE = 3


@pytest.mark.parametrize(
    ("fraction", "batch_size", "length", "stride", "forced"),
    [
        (0.5, 8, 16, 1, [4, 5, 6, 7, 12, 13, 14, 15]),
        (0.33, 2, 6, 1, [1, 3, 5]),  # ceil(0.66) = 1 of 2, as nnU-Net's 1/3 with batch 2
        (0.33, 32, 32, 1, list(range(21, 32))),  # ceil(10.56) = 11 of 32
        (0.5, 4, 10, 1, [2, 3, 6, 7, 9]),  # the last batch has 2 items: 1 forced
        (0.0, 4, 8, 1, []),
        (1.0, 3, 5, 1, [0, 1, 2, 3, 4]),
        # 2 ranks split the items r, r + 2, ...: rank 0 gets 0, 2, 4, 6 = positions 0..3 of its batch of 4
        (0.5, 4, 16, 2, [4, 5, 6, 7, 12, 13, 14, 15]),
    ],
)
def test_batch_plan_forces_the_last_items_of_each_batch(fraction, batch_size, length, stride, forced):
    plan = BatchPlan(fraction, batch_size, length, stride)
    assert [i for i in range(length) if plan.forced(i)] == forced


def test_windows_around_a_voxel_contain_it_and_vary():
    rng = np.random.default_rng(0)
    for shape, size in [((40, 30), (16, 16)), ((10, 6), (16, 16)), ((20, 20, 8), (8, 8, 8))]:
        starts_seen = set()
        for _ in range(200):
            voxel = [int(rng.integers(n)) for n in shape]
            starts = window_starts(shape, size, "random", rng, voxel)
            assert all(s <= v < s + n for s, v, n in zip(starts, voxel, size, strict=True))
            inside = zip(starts, shape, size, strict=True)
            assert all(min(0, d - n) <= s <= max(0, d - n) for s, d, n in inside)
            starts_seen.add(tuple(starts))
        assert len(starts_seen) > 20  # random among the windows that contain the voxel, not centred


def _rare_spec(tmp_path, **kwargs):
    return validate(detect_layout(make_rare_msd(tmp_path / "rare", **kwargs)))


def test_class_locations_list_every_class_and_the_cases_holding_it(tmp_path):
    spec = _rare_spec(tmp_path, n_cases=4, rare_cases=(2,))
    loader = CaseLoader(spec)
    locations = ClassLocations.gather(spec.cases_train, loader.load_label)
    assert locations.classes == [1, 2, 3]
    assert locations.cases_with[RARE].tolist() == [2] and locations.cases_with[1].tolist() == [0, 1, 2, 3]
    rare = locations.voxels[(2, RARE)]
    assert len(rare) == 4 and set(rare[:, 2].tolist()) == {RARE_Z}
    label = loader.load_label(spec.cases_train[0])
    assert all(label[tuple(v)] == 1 for v in locations.voxels[(0, 1)])


def _draw_batches(dataset, batch_size: int, epochs: int, workers: int = 0) -> list[dict]:
    """Every batch of ``epochs`` passes of an unshuffled loader (the way the data module loads them)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    return [batch for _ in range(epochs) for batch in loader]


def _contains(labels: torch.Tensor, cls: int | None = None) -> np.ndarray:
    """Per sample of a batch: does its label show ``cls`` (any foreground class when ``None``)?"""
    flat = labels.reshape(len(labels), -1)
    return (flat > 0 if cls is None else flat == cls).any(dim=1).numpy()


@pytest.mark.parametrize("patch_size", [None, (8, 8)], ids=["whole-slices", "crops"])
def test_2d_oversampling_shows_a_class_in_half_of_every_batch_uniformly_per_class(tmp_path, patch_size):
    # 4 cases x 10 slices; the rare class is in 1 slice of 40 (2.5 %), classes 1 and 2 in 4 and 2 per case
    spec = _rare_spec(tmp_path, n_cases=4, rare_cases=(1,))
    torch.manual_seed(0)
    ds = TrainingSlices2D(
        spec.cases_train, CaseLoader(spec, cache="memory"), patch_size=patch_size, oversample=0.5,
        batch_size=8,
    )
    batches = _draw_batches(ds, batch_size=8, epochs=40)  # 200 batches
    assert len(batches) == 200 and all(len(b["label"]) == 8 for b in batches)
    forced = np.stack([_contains(b["label"])[4:] for b in batches])
    assert forced.all()  # the last 4 of every batch show a foreground class
    assert all(_contains(b["label"]).sum() >= 4 for b in batches)
    rare_forced = np.mean([_contains(b["label"], RARE)[4:] for b in batches])
    # uniform over the 3 classes: 1/3 of 800 forced items (std 0.017); class 3 shares no slice with the others
    assert abs(rare_forced - 1 / 3) < 0.07, rare_forced
    rare_random = np.mean([_contains(b["label"], RARE)[:4] for b in batches])
    assert rare_random < 0.07, rare_random  # the first 4 are uniform slices: 1/40 of them show it


def test_2d_without_oversampling_draws_the_rare_class_at_its_natural_rate(tmp_path):
    spec = _rare_spec(tmp_path, n_cases=4, rare_cases=(1,))
    torch.manual_seed(0)
    ds = TrainingSlices2D(spec.cases_train, CaseLoader(spec, cache="memory"), oversample=0.0, batch_size=8)
    batches = _draw_batches(ds, batch_size=8, epochs=50)  # 2000 slices
    rare = np.mean(np.concatenate([_contains(b["label"], RARE) for b in batches]))
    assert abs(rare - 1 / 40) < 0.015, rare  # 1 slice of 40 (std 0.0035)
    any_fg = np.mean(np.concatenate([_contains(b["label"]) for b in batches]))
    assert abs(any_fg - 17 / 40) < 0.04, any_fg  # z 3..6 of each case and the rare slice of case 1
    counts = np.bincount(np.concatenate([b["slice_index"].numpy() for b in batches]), minlength=SHAPE[2])
    assert counts.min() > 0.6 * counts.mean()  # every slice drawn, about uniformly


def test_3d_patches_put_a_class_in_the_forced_items(tmp_path):
    spec = _rare_spec(tmp_path, n_cases=3, rare_cases=(0,))
    torch.manual_seed(0)
    ds = PatchDataset(
        spec.cases_train, CaseLoader(spec, cache="memory"), (6, 6, 3), samples_per_case=40, oversample=0.5,
        batch_size=4,
    )
    batches = _draw_batches(ds, batch_size=4, epochs=3)  # 90 batches of 4
    assert all(_contains(b["label"])[2:].all() for b in batches)
    rare_forced = np.mean([_contains(b["label"], RARE)[2:] for b in batches])
    assert abs(rare_forced - 1 / 3) < 0.1, rare_forced
    rare_random = np.mean([_contains(b["label"], RARE)[:2] for b in batches])
    assert rare_random < 0.12, rare_random


def test_datamodule_draws_the_training_batches_in_order_seeded_and_in_workers(tmp_path):
    root = make_rare_msd(tmp_path / "rare", n_cases=6, rare_cases=(0,))
    split = tmp_path / "split.json"
    ids = [f"case_{i:03d}" for i in range(6)]
    split.write_text(json.dumps({"train": ids[:4], "val": ids[4:]}))

    def labels(seed: int, workers: int) -> list[torch.Tensor]:
        dm = SegmentationDataModule(root=str(root), split_file=str(split), batch_size=8, oversample=0.5,
                                    cache="memory", seed=seed, num_workers=workers)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert not isinstance(loader.sampler, torch.utils.data.RandomSampler)  # positions decide, no shuffle
        return [batch["label"] for _ in range(4) for batch in loader]

    torch.manual_seed(0)
    first = labels(seed=0, workers=0)
    assert len(first) == 4 * 5 and all(_contains(b)[4:].all() for b in first)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(first, labels(seed=0, workers=0), strict=True))
    torch.manual_seed(0)
    assert not all(torch.equal(a, b) for a, b in zip(first, labels(seed=1, workers=0), strict=True))
    in_workers = labels(seed=0, workers=2)
    assert len(in_workers) == 20 and all(_contains(b)[4:].all() for b in in_workers)
    assert not torch.equal(in_workers[0], in_workers[1])  # the two workers draw different streams


@pytest.mark.parametrize("value", [1.5, -0.1, "half"])
def test_oversample_out_of_range_is_an_error(value):
    with pytest.raises(ValueError, match=rf"oversample={value!r}: expected a float in \[0, 1\]"):
        SegmentationDataModule(oversample=value)


def test_memory_cached_slices_are_at_least_half_as_fast_as_plain_numpy_slicing(tmp_path):
    shape = (96, 96, 32)
    spec = validate(detect_layout(make_msd(tmp_path / "m", n_cases=4, n_test=0, shape=shape)))
    loader = CaseLoader(spec, cache="memory")
    ds = TrainingSlices2D(spec.cases_train, loader, oversample=0.33, batch_size=16)
    images = [loader.load(c).image for c in spec.cases_train]
    labels = [loader.load(c).label for c in spec.cases_train]
    rng = np.random.default_rng(0)
    n = 400
    picks = [(int(rng.integers(len(images))), int(rng.integers(shape[2]))) for _ in range(n)]

    def plain() -> None:
        for c, s in picks:
            torch.from_numpy(images[c][:, :, :, s].copy()), torch.from_numpy(labels[c][:, :, s].copy())

    def dataset() -> None:
        for i in range(n):
            ds[i]

    best = {plain: np.inf, dataset: np.inf}
    for run in [plain, dataset] * 7:  # CPU time of this process, interleaved, best of 7: robust to load
        start = time.process_time()
        run()
        best[run] = min(best[run], time.process_time() - start)
    ratio = best[plain] / best[dataset]  # items/s of the dataset over items/s of plain slicing
    assert ratio >= 0.5, ratio

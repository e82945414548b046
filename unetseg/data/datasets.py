"""Datasets of samples: 2D slices, 3D patches and whole volumes of real cases, and the synthetic splits.

Every dataset yields ``{"image": float32 tensor (C, *spatial), "label": int64 tensor (*spatial),
"case_id": str, "spacing": float32 tensor (spatial_dims,)}`` (``label`` is left out for unlabelled test
cases); 2D slices also carry ``"slice_index"`` (int, index along the slicing axis; 0 for 2D images) and
``"slice_spacing"`` (float32 scalar tensor, the spacing along that axis; 1.0 for 2D images). ``spacing`` is
the voxel size (mm for NIfTI, 1.0 for raster images) along the sample's spatial axes, after
resampling/resizing. The default collate turns them into ``case_id: list[str]``, ``spacing: (B,
spatial_dims)``, ``slice_index: (B,)`` and ``slice_spacing: (B,)``.

Evaluation datasets list their samples in order: ``SliceDataset2D`` (every slice of every case) and
``VolumeDataset`` (whole volumes, batch size 1, or central crops). Training datasets draw their samples
(``TrainingSlices2D``, ``PatchDataset``: see ``unetseg.data.sampling`` for the class-aware oversampling) and
take a ``transform`` (``unetseg.data.transforms``); evaluation datasets are never augmented.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from unetseg.data.cases import CaseLoader
from unetseg.data.formats.layout import Case
from unetseg.data.sampling import ClassSampler, WorkerRandom, randint, window_starts
from unetseg.data.synthetic import SyntheticSegmentation
from unetseg.data.transforms import Transform, as_transform

CROP_MODES: tuple[str, ...] = ("random", "center")


def extract_window(
    array: np.ndarray, starts: Sequence[int], size: Sequence[int], fill: float = 0
) -> np.ndarray:
    """Window ``[starts, starts + size)`` of the trailing spatial axes, ``fill`` outside the array.

    >>> extract_window(np.arange(4).reshape(2, 2), (-1, 0), (3, 2)).tolist()
    [[0, 0], [0, 1], [2, 3]]
    """
    lead = array.ndim - len(size)
    spatial = array.shape[lead:]
    src = tuple(slice(max(s, 0), min(s + n, dim)) for s, n, dim in zip(starts, size, spatial, strict=True))
    part = array[(slice(None),) * lead + src]
    if part.shape[lead:] == tuple(size):
        return part
    out = np.full(array.shape[:lead] + tuple(size), fill, dtype=array.dtype)
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, starts, strict=True))
    out[(slice(None),) * lead + dst] = part
    return out


def make_sample(
    image: np.ndarray, label: np.ndarray | None, case_id: str, spacing: Sequence[float]
) -> dict[str, Any]:
    """``{"image": float32 (C, *spatial), "label": int64 (*spatial), "case_id", "spacing": float32 (D,)}``.

    The arrays are copied once into new contiguous tensors (views of cached volumes are never shared).
    """
    sample: dict[str, Any] = {"image": torch.from_numpy(np.array(image, dtype=np.float32, order="C"))}
    if label is not None:
        sample["label"] = torch.from_numpy(np.array(label, dtype=np.int64, order="C"))
    sample["case_id"] = case_id
    sample["spacing"] = torch.from_numpy(np.array(spacing, dtype=np.float32))
    return sample


def _resize2d(
    image: np.ndarray, label: np.ndarray | None, size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize ``image (C, H, W)`` (linear) and ``label (H, W)`` (nearest) to ``size`` (H, W)."""
    import cv2

    h, w = size
    hwc = np.ascontiguousarray(np.moveaxis(image, 0, -1), dtype=np.float32)
    out = cv2.resize(hwc, (w, h), interpolation=cv2.INTER_LINEAR)
    out = out[..., None] if out.ndim == 2 else out
    if label is not None:
        dtype = np.uint8 if label.max(initial=0) < 256 else np.uint16
        label = cv2.resize(label.astype(dtype), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int64)
    return np.moveaxis(out, -1, 0), label


def _check_size(size: Sequence[int] | None, spatial_dims: int, name: str) -> tuple[int, ...] | None:
    """``size`` as ints, ``None`` kept; raises unless it has ``spatial_dims`` values."""
    if size is not None and len(size) != spatial_dims:
        raise ValueError(f"{name} {list(size)} must have {spatial_dims} values (samples are {spatial_dims}D)")
    return None if size is None else tuple(int(s) for s in size)


class SliceDataset2D(WorkerRandom, Dataset):
    """Every 2D slice along ``axis`` of the cases' volumes, in case order (a 2D case is its own single slice).

    ``resize`` first resizes each slice (2D image folders of mixed sizes); ``patch_size`` then pads/crops it
    (a random window with ``crop="random"``, the central one with ``"center"``). Construction reads file
    headers only.

    >>> ds = SliceDataset2D(splits.val, loader, axis=2, patch_size=(64, 64), crop="center")  # doctest: +SKIP
    >>> ds[0]["image"].shape, ds[0]["label"].shape  # doctest: +SKIP
    (torch.Size([1, 64, 64]), torch.Size([64, 64]))
    """

    def __init__(
        self,
        cases: Sequence[Case],
        loader: CaseLoader,
        axis: int = 2,
        patch_size: Sequence[int] | None = None,
        transform: Any = None,
        crop: str = "random",
        resize: Sequence[int] | None = None,
    ) -> None:
        if crop not in CROP_MODES:
            raise ValueError(f"crop={crop!r}: expected one of {list(CROP_MODES)}")
        if loader.spec.spatial_dims == 3 and not -3 <= axis < 3:
            raise ValueError(f"axis={axis!r}: expected 0, 1 or 2 for 3D volumes")
        self.cases = list(cases)
        self.loader = loader
        self.axis = axis % 3
        self.patch_size = _check_size(patch_size, 2, "patch_size")
        self.resize = _check_size(resize, 2, "resize")
        self.transform: Transform | None = as_transform(transform)
        self.crop = crop
        counts = [self._num_slices(case) for case in self.cases]
        self.case_index = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        self.slice_index = np.concatenate([np.arange(n, dtype=np.int32) for n in [0, *counts]])

    def _num_slices(self, case: Case) -> int:
        """Slices of ``case`` along ``axis`` (1 for a 2D image), from its header."""
        shape = self.loader.spatial_shape(case)
        return 1 if len(shape) == 2 else shape[self.axis]

    def __len__(self) -> int:
        return len(self.case_index)

    def case_ids(self) -> list[str]:
        """Case id of each sample, in sample order."""
        return [self.cases[int(i)].case_id for i in self.case_index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._sample(int(self.case_index[index]), int(self.slice_index[index]), None, self.rng())

    def _sample(
        self, case_index: int, slice_index: int, voxel: np.ndarray | None, rng: np.random.Generator
    ) -> dict[str, Any]:
        """Slice ``slice_index`` of case ``case_index``, resized, windowed (around the in-plane ``voxel``)."""
        loaded = self.loader.load(self.cases[case_index])
        image, label, spacing = loaded.image, loaded.label, loaded.spacing
        slice_spacing = 1.0
        if image.ndim == 4:  # a volume: the slice is a view, copied once by make_sample
            image = image[(slice(None),) * (self.axis + 1) + (slice_index,)]
            label = None if label is None else label[(slice(None),) * self.axis + (slice_index,)]
            slice_spacing = spacing[self.axis]
            spacing = spacing[: self.axis] + spacing[self.axis + 1 :]
        if self.resize is not None and image.shape[1:] != self.resize:
            if voxel is not None:
                scale = zip(voxel, image.shape[1:], self.resize, strict=True)
                voxel = np.array([min(int((v + 0.5) * m / n), m - 1) for v, n, m in scale])
            spacing = tuple(v * n / m for v, n, m in zip(spacing, image.shape[1:], self.resize, strict=True))
            image, label = _resize2d(image, label, self.resize)
        if self.patch_size is not None:
            starts = window_starts(image.shape[1:], self.patch_size, self.crop, rng, voxel)
            image = extract_window(image, starts, self.patch_size)
            label = None if label is None else extract_window(label, starts, self.patch_size)
        if self.transform is not None:
            image, label = self.transform(image, label, rng)
        sample = make_sample(image, label, self.cases[case_index].case_id, spacing)
        sample["slice_index"] = slice_index
        sample["slice_spacing"] = torch.from_numpy(np.array(slice_spacing, dtype=np.float32))
        return sample


class TrainingSlices2D(SliceDataset2D):
    """2D training slices, drawn; the last ``ceil(oversample * batch_size)`` of each batch on a class.

    An epoch has one item per slice of the cases, or ``length`` items. A forced item (see
    ``unetseg.data.sampling``) is the slice of a random voxel of a uniformly drawn foreground class, cropped
    (``patch_size``) by a random window that contains the voxel; any other item is a uniformly random slice
    with a random window. Construction reads
    each label once when ``oversample > 0`` (the class voxels), none otherwise. Use it with an unshuffled
    loader of the same ``batch_size``.

    >>> ds = TrainingSlices2D(cases, loader, oversample=0.5, batch_size=8)  # doctest: +SKIP
    >>> batch = next(iter(DataLoader(ds, batch_size=8)))  # items 4..7 show a class  # doctest: +SKIP
    """

    def __init__(
        self,
        cases: Sequence[Case],
        loader: CaseLoader,
        oversample: float = 0.0,
        batch_size: int = 1,
        seed: int = 0,
        axis: int = 2,
        patch_size: Sequence[int] | None = None,
        resize: Sequence[int] | None = None,
        transform: Any = None,
        length: int | None = None,
    ) -> None:
        super().__init__(cases, loader, axis, patch_size, transform, crop="random", resize=resize)
        self.length = length or len(self.case_index)
        self.seed = seed
        self._in_plane = [a for a in range(3) if a != self.axis]
        self.class_sampler = ClassSampler(
            self.cases, loader.load_label, oversample, batch_size, len(self), seed
        )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self.rng()
        hit = self.class_sampler.pick(index, rng)
        if hit is None:
            item = randint(rng, len(self.case_index))
            return self._sample(int(self.case_index[item]), int(self.slice_index[item]), None, rng)
        case_index, voxel = hit
        if len(voxel) == 2:  # a 2D image
            return self._sample(case_index, 0, voxel, rng)
        return self._sample(case_index, int(voxel[self.axis]), voxel[self._in_plane], rng)


class PatchDataset(WorkerRandom, Dataset):
    """3D training patches; the last ``ceil(oversample * batch_size)`` of each batch on a class.

    An epoch has ``samples_per_case`` items per case, or ``length`` items. A forced item (see
    ``unetseg.data.sampling``) is a random window around a random voxel of a uniformly drawn foreground
    class; any other item is a random window of a random case. Volumes smaller than the patch are padded
    (image 0, label 0 = background).
    Construction reads each label once when ``oversample > 0``. Use it with an unshuffled loader of the same
    ``batch_size``.

    >>> ds = PatchDataset(cases, loader, (64, 64, 64), oversample=0.33, batch_size=2)  # doctest: +SKIP
    >>> ds[1]["image"].shape, ds[1]["label"].shape  # item 1: forced onto a class  # doctest: +SKIP
    (torch.Size([1, 64, 64, 64]), torch.Size([64, 64, 64]))
    """

    def __init__(
        self,
        cases: Sequence[Case],
        loader: CaseLoader,
        patch_size: Sequence[int],
        samples_per_case: int = 1,
        oversample: float = 0.0,
        batch_size: int = 1,
        transform: Any = None,
        seed: int = 0,
        length: int | None = None,
    ) -> None:
        if samples_per_case < 1:
            raise ValueError(f"samples_per_case={samples_per_case!r}: expected an int >= 1")
        if not cases:
            raise ValueError("PatchDataset needs at least one case")
        self.cases = list(cases)
        self.loader = loader
        self.patch_size = _check_size(patch_size, loader.spec.spatial_dims, "patch_size")
        self.samples_per_case = samples_per_case
        self.length = length or len(self.cases) * samples_per_case
        self.transform: Transform | None = as_transform(transform)
        self.seed = seed
        self.class_sampler = ClassSampler(
            self.cases, loader.load_label, oversample, batch_size, len(self), seed
        )

    def __len__(self) -> int:
        return self.length

    def case_ids(self) -> list[str]:
        """Case id of each item if the cases were visited in turn (the items themselves are drawn)."""
        return [self.cases[i % len(self.cases)].case_id for i in range(len(self))]

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self.rng()
        case_index, voxel = self.class_sampler.pick(index, rng) or (randint(rng, len(self.cases)), None)
        loaded = self.loader.load(self.cases[case_index])
        starts = window_starts(loaded.image.shape[1:], self.patch_size, "random", rng, voxel)
        image = extract_window(loaded.image, starts, self.patch_size)
        label = None if loaded.label is None else extract_window(loaded.label, starts, self.patch_size)
        if self.transform is not None:
            image, label = self.transform(image, label, rng)
        return make_sample(image, label, loaded.case_id, loaded.spacing)


class VolumeDataset(Dataset):
    """Whole cases for validation/test (batch size 1, sliding window), or central crops of ``crop_size``.

    >>> ds = VolumeDataset(splits.val, loader, crop_size=(96, 96, 96))  # doctest: +SKIP
    >>> ds[0]["image"].shape  # torch.Size([1, 96, 96, 96])  # doctest: +SKIP
    """

    def __init__(
        self, cases: Sequence[Case], loader: CaseLoader, crop_size: Sequence[int] | None = None
    ) -> None:
        self.cases = list(cases)
        self.loader = loader
        self.crop_size = _check_size(crop_size, loader.spec.spatial_dims, "crop_size")

    def __len__(self) -> int:
        return len(self.cases)

    def case_ids(self) -> list[str]:
        """Case id of each sample, in sample order."""
        return [c.case_id for c in self.cases]

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        loaded = self.loader.load(case)
        image, label = loaded.image, loaded.label
        if self.crop_size is not None:
            starts = window_starts(image.shape[1:], self.crop_size, "center", np.random.default_rng(0))
            image = extract_window(image, starts, self.crop_size)
            label = None if label is None else extract_window(label, starts, self.crop_size)
        return make_sample(image, label, case.case_id, loaded.spacing)


class SyntheticSplit(WorkerRandom, Dataset):
    """A ``SyntheticSegmentation`` split with the keys of the real datasets, cropped/augmented when training.

    Items are ``{"image", "label", "case_id": "<split>_<index>", "spacing": ones (spatial_dims,)}``; with
    ``patch_size`` each image is padded/cropped to a random window of that size, then ``transform`` runs.

    >>> ds = SyntheticSplit(SyntheticSegmentation(4, spatial_size=32), patch_size=(16, 16))
    >>> ds[0]["image"].shape, ds[0]["case_id"]
    (torch.Size([1, 16, 16]), 'train_00000')
    """

    def __init__(
        self,
        data: SyntheticSegmentation,
        patch_size: Sequence[int] | None = None,
        transform: Transform | None = None,
    ) -> None:
        self.data = data
        self.patch_size = None if patch_size is None else tuple(patch_size)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.data[index]
        image, label = item["image"].numpy(), item["label"].numpy()
        if self.patch_size is not None or self.transform is not None:
            rng = self.rng()
            if self.patch_size is not None:
                starts = window_starts(label.shape, self.patch_size, "random", rng)
                image = extract_window(image, starts, self.patch_size)
                label = extract_window(label, starts, self.patch_size)
            if self.transform is not None:
                image, label = self.transform(image, label, rng)
        case_id = f"{self.data.split}_{index % len(self.data):05d}"
        return make_sample(image, label, case_id, (1.0,) * self.data.spatial_dims)

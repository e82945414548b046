"""Datasets over real cases: 2D slices of volumes, 3D patches with foreground oversampling, whole volumes.

Every dataset yields ``{"image": float32 tensor (C, *spatial), "label": int64 tensor (*spatial),
"case_id": str, "spacing": float32 tensor (spatial_dims,)}`` (``label`` is left out for unlabelled test
cases); 2D slices also carry ``"slice_index"`` (int, index along the slicing axis; 0 for 2D images) and
``"slice_spacing"`` (float32 scalar tensor, the spacing along that axis; 1.0 for 2D images). ``spacing`` is
the voxel size (mm for NIfTI, 1.0 for raster images) along the sample's spatial axes, after
resampling/resizing. The default collate turns them into ``case_id: list[str]``, ``spacing: (B,
spatial_dims)``, ``slice_index: (B,)`` and ``slice_spacing: (B,)``.

Loading goes through a ``CaseLoader``: read the files (lazily, on first use), resample to ``target_spacing``
(optional, off by default: ``scipy.ndimage.zoom``, linear for images and nearest for labels, applied to the
whole case before slicing or cropping), normalize per channel, then keep

* nothing but the most recent case per process (``cache=False``, the default): memory stays flat whatever the
  number of cases; each sample re-reads its case (cheap for small volumes, slow for large ``.nii.gz``);
* every loaded case in memory (``cache="memory"`` / ``True``): fast, memory grows with the dataset (call
  ``preload`` before the DataLoader forks its workers so that they share the arrays);
* preprocessed arrays as ``.npy`` files in ``cache_dir`` (``cache="disk"``), memory-mapped when read: the
  first epoch writes them, later ones read only the voxels they need.

Validation/test in 3D use ``VolumeDataset``: whole volumes (batch size 1, for sliding-window inference) or,
with ``crop_size``, a central crop (padded when the volume is smaller). Training datasets take a ``transform``
(see ``unetseg.data.transforms``); validation and test datasets are built with ``transform=None``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from unetseg.data.formats.io import read_header, read_image, read_label
from unetseg.data.formats.layout import Case, DatasetSpec
from unetseg.data.normalize import ChannelNormalizer, build_normalization
from unetseg.data.transforms import Transform, as_transform

CACHE_MODES: tuple[str, ...] = ("none", "memory", "disk")
MAX_FG_LOCATIONS = 10_000


@dataclass
class LoadedCase:
    """A case as arrays: normalized ``image (C, *spatial) float32``, ``label (*spatial) int64`` / ``None``."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None
    _fg: dict[int, np.ndarray] | None = field(default=None, repr=False)

    def foreground_locations(self) -> dict[int, np.ndarray]:
        """``{class: coords (n, spatial_dims)}`` of up to ``MAX_FG_LOCATIONS`` voxels per foreground class."""
        if self._fg is None:
            self._fg = {}
            if self.label is not None:
                rng = np.random.default_rng(0)
                for cls in np.unique(self.label):
                    if cls <= 0:
                        continue
                    coords = np.argwhere(self.label == cls)
                    if len(coords) > MAX_FG_LOCATIONS:
                        coords = coords[rng.choice(len(coords), MAX_FG_LOCATIONS, replace=False)]
                    self._fg[int(cls)] = coords.astype(np.int32)
        return self._fg


def resample(
    image: np.ndarray, label: np.ndarray | None, spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray | None]:
    """``image (C, *spatial)`` (linear) and ``label`` (nearest) from ``spacing`` to ``target_spacing``."""
    from scipy.ndimage import zoom

    if len(target_spacing) != image.ndim - 1:
        raise ValueError(
            f"target_spacing {list(target_spacing)} has {len(target_spacing)} values; the images have "
            f"{image.ndim - 1} spatial axes"
        )
    factors = [s / t for s, t in zip(spacing, target_spacing, strict=True)]
    if np.allclose(factors, 1.0):
        return image, label
    image = np.stack([zoom(channel, factors, order=1) for channel in image]).astype(np.float32)
    label = None if label is None else zoom(label, factors, order=0)
    return image, label


class CaseLoader:
    """Reads, resamples and normalizes cases on demand, with an optional memory or disk cache.

    >>> loader = CaseLoader(spec, normalization=None, cache="memory")  # doctest: +SKIP
    >>> loader.load(spec.cases_train[0]).image.shape  # (C, X, Y, Z)  # doctest: +SKIP
    (1, 35, 51, 35)
    """

    def __init__(
        self,
        spec: DatasetSpec,
        normalization: Any = None,
        target_spacing: Sequence[float] | None = None,
        cache: bool | str = False,
        cache_dir: str | Path | None = None,
    ) -> None:
        mode = {False: "none", True: "memory", None: "none"}.get(cache, cache)  # type: ignore[call-overload]
        if mode not in CACHE_MODES:
            raise ValueError(f"cache must be one of {list(CACHE_MODES)} (or a bool), got {cache!r}")
        if target_spacing is not None and len(target_spacing) != spec.spatial_dims:
            raise ValueError(
                f"target_spacing {list(target_spacing)} must have {spec.spatial_dims} values "
                f"(the dataset is {spec.spatial_dims}D)"
            )
        self.spec = spec
        self.normalizer = (
            normalization
            if isinstance(normalization, ChannelNormalizer)
            else build_normalization(normalization, spec)
        )
        self.target_spacing = None if target_spacing is None else tuple(float(s) for s in target_spacing)
        self.cache = mode
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if mode == "disk" and self.cache_dir is None:
            raise ValueError(
                "cache='disk' needs cache_dir (a writable folder for the preprocessed .npy arrays)"
            )
        self._memory: dict[str, LoadedCase] = {}
        self._recent: OrderedDict[str, LoadedCase] = OrderedDict()

    def _key(self, case: Case) -> str:
        """Case id + hash of everything that changes the preprocessed arrays."""
        parts = [str(p) for p in case.images] + [
            str(case.label),
            repr(self.normalizer),
            str(self.target_spacing),
            self.spec.label_mode,
        ]
        return f"{case.case_id}-{hashlib.sha1('|'.join(parts).encode()).hexdigest()[:12]}"

    def _read(self, case: Case) -> LoadedCase:
        """Read, resample and normalize one case (no cache)."""
        image, header = read_image(case, self.spec)
        label = read_label(case, self.spec)
        if label is not None and label.shape != image.shape[1:]:
            raise ValueError(
                f"image {case.images[0]} shape {image.shape[1:]} and label {case.label} shape "
                f"{label.shape} disagree"
            )
        spacing = tuple(header.spacing[: image.ndim - 1])
        if self.target_spacing is not None:
            image, label = resample(image, label, spacing, self.target_spacing)
            spacing = self.target_spacing
        return LoadedCase(case.case_id, self.normalizer(image), label, spacing, header.affine)

    def _disk(self, case: Case) -> LoadedCase:
        """Read a case from the disk cache (memory-mapped), writing it there first if needed."""
        assert self.cache_dir is not None
        base = self.cache_dir / self._key(case)
        paths = {
            name: base.with_name(f"{base.name}_{name}") for name in ("image.npy", "label.npy", "meta.json")
        }
        if not paths["meta.json"].is_file():
            loaded = self._read(case)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for name, array in (("image.npy", loaded.image), ("label.npy", loaded.label)):
                if array is not None:
                    tmp = paths[name].with_name(f"{paths[name].name}.{os.getpid()}.tmp.npy")
                    np.save(tmp, array)
                    os.replace(tmp, paths[name])
            meta = {
                "spacing": list(loaded.spacing),
                "affine": None if loaded.affine is None else np.asarray(loaded.affine).tolist(),
            }
            tmp = paths["meta.json"].with_name(f"{paths['meta.json'].name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, paths["meta.json"])
        meta = json.loads(paths["meta.json"].read_text())
        label = np.load(paths["label.npy"], mmap_mode="r") if paths["label.npy"].is_file() else None
        affine = None if meta["affine"] is None else np.asarray(meta["affine"])
        return LoadedCase(
            case.case_id, np.load(paths["image.npy"], mmap_mode="r"), label, tuple(meta["spacing"]), affine
        )

    def load(self, case: Case) -> LoadedCase:
        """The preprocessed case, from the cache when there is one."""
        if case.case_id in self._memory:
            return self._memory[case.case_id]
        if case.case_id in self._recent:
            return self._recent[case.case_id]
        loaded = self._disk(case) if self.cache == "disk" else self._read(case)
        if self.cache == "memory":
            self._memory[case.case_id] = loaded
        else:  # keep the last case only: consecutive slices of one volume do not re-read it
            self._recent.clear()
            self._recent[case.case_id] = loaded
        return loaded

    def preload(self, cases: Sequence[Case]) -> None:
        """Load ``cases`` into the cache now (call before DataLoader workers fork, so they share it)."""
        for case in cases:
            self.load(case)

    def load_label(self, case: Case) -> np.ndarray | None:
        """The (resampled) label only, without normalizing or caching the image."""
        if self.cache != "none" or self.target_spacing is not None:
            return self.load(case).label
        return read_label(case, self.spec)

    def spatial_shape(self, case: Case) -> tuple[int, ...]:
        """Spatial shape after resampling, from the file header (no voxel data read)."""
        header = read_header(case.images[0])
        shape = header.shape[: self.spec.spatial_dims]
        if self.target_spacing is None:
            return tuple(shape)
        factors = [s / t for s, t in zip(header.spacing, self.target_spacing, strict=False)]
        if np.allclose(factors, 1.0):
            return tuple(shape)
        return tuple(int(round(n * f)) for n, f in zip(shape, factors, strict=True))

    def cached_arrays(self) -> int:
        """Number of cases currently held in memory (the most recent one included)."""
        return len(self._memory) + len(self._recent)


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
    """``{"image": float32 (C, *spatial), "label": int64 (*spatial), "case_id", "spacing": float32 (D,)}``."""
    sample: dict[str, Any] = {
        "image": torch.from_numpy(np.array(image, dtype=np.float32, order="C", copy=True))
    }
    if label is not None:
        sample["label"] = torch.from_numpy(np.array(label, dtype=np.int64, order="C", copy=True))
    sample["case_id"] = case_id
    sample["spacing"] = torch.tensor([float(s) for s in spacing], dtype=torch.float32)
    return sample


class WorkerRandom:
    """Numpy generator per process, seeded from torch (reproducible via ``seed_everything(workers=True)``)."""

    _gen: np.random.Generator | None = None
    _gen_key: tuple[int, int] | None = None

    def rng(self) -> np.random.Generator:
        """This process's (worker's) generator; workers get distinct streams."""
        info = get_worker_info()
        key = (os.getpid(), -1 if info is None else info.id)
        if self._gen is None or self._gen_key != key:
            self._gen = np.random.default_rng(torch.initial_seed())
            self._gen_key = key
        return self._gen


def window_starts(
    shape: Sequence[int], size: Sequence[int], mode: str, rng: np.random.Generator
) -> list[int]:
    """Window starts for ``mode`` ``random`` (uniform) or ``center``; negative starts pad small images."""
    starts = []
    for dim, n in zip(shape, size, strict=True):
        lo, hi = min(0, dim - n), max(0, dim - n)
        starts.append(int(rng.integers(lo, hi + 1)) if mode == "random" else (dim - n) // 2)
    return starts


class SliceDataset2D(WorkerRandom, Dataset):
    """2D slices along ``axis`` of the cases' volumes (a 2D case is its own single slice).

    ``foreground_only`` keeps slices whose label has foreground; ``foreground_fraction=f`` keeps all of them
    plus just enough randomly chosen (seeded) background slices that foreground slices make up ``f`` of the
    dataset (all slices if they already do). Both read the labels once at construction (then let them go).
    ``patch_size`` pads/crops each slice (random window when ``crop="random"``, central with ``"center"``);
    ``resize`` first resizes each slice to a fixed size (2D image folders of mixed sizes).

    >>> ds = SliceDataset2D(splits.train, loader, axis=2, patch_size=(64, 64))  # doctest: +SKIP
    >>> ds[0]["image"].shape, ds[0]["label"].shape  # doctest: +SKIP
    (torch.Size([1, 64, 64]), torch.Size([64, 64]))
    """

    def __init__(
        self,
        cases: Sequence[Case],
        loader: CaseLoader,
        axis: int = 2,
        patch_size: Sequence[int] | None = None,
        foreground_only: bool = False,
        foreground_fraction: float | None = None,
        transform: Any = None,
        crop: str = "random",
        resize: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got '{crop}'")
        if foreground_only and foreground_fraction is not None:
            raise ValueError("use either foreground_only or foreground_fraction, not both")
        if foreground_fraction is not None and not 0 < foreground_fraction <= 1:
            raise ValueError(f"foreground_fraction must be in (0, 1], got {foreground_fraction}")
        if patch_size is not None and len(patch_size) != 2:
            raise ValueError(f"patch_size must have 2 values for 2D slices, got {list(patch_size)}")
        if loader.spec.spatial_dims == 3 and not -3 <= axis < 3:
            raise ValueError(f"axis must be 0, 1 or 2 for 3D volumes, got {axis}")
        self.cases = list(cases)
        self.loader = loader
        self.axis = axis % 3
        self.patch_size = None if patch_size is None else tuple(int(s) for s in patch_size)
        self.resize = None if resize is None else tuple(int(s) for s in resize)
        self.transform: Transform | None = as_transform(transform)
        self.crop = crop
        case_index, slice_index, has_fg = [], [], []
        need_fg = foreground_only or foreground_fraction is not None
        for ci, case in enumerate(self.cases):
            if need_fg:
                label = loader.load_label(case)
                if label is None:
                    raise ValueError(f"foreground filtering needs labels; case {case.case_id} has none")
                if label.ndim == 2:
                    fg = np.array([label.any()])
                else:
                    other = tuple(a for a in range(3) if a != self.axis)
                    fg = np.asarray(label > 0).any(axis=other)
                del label
            else:
                shape = loader.spatial_shape(case)
                fg = np.zeros(1 if len(shape) == 2 else shape[self.axis], dtype=bool)
            case_index.append(np.full(len(fg), ci, dtype=np.int32))
            slice_index.append(np.arange(len(fg), dtype=np.int32))
            has_fg.append(fg)
        cidx = np.concatenate(case_index) if case_index else np.zeros(0, np.int32)
        sidx = np.concatenate(slice_index) if slice_index else np.zeros(0, np.int32)
        fg_all = np.concatenate(has_fg) if has_fg else np.zeros(0, bool)
        keep = np.ones(len(fg_all), dtype=bool)
        if foreground_only:
            keep = fg_all
        elif foreground_fraction is not None:
            n_fg = int(fg_all.sum())
            bg = np.flatnonzero(~fg_all)
            n_bg = min(len(bg), int(round(n_fg * (1 - foreground_fraction) / foreground_fraction)))
            keep = fg_all.copy()
            keep[np.random.default_rng(seed).choice(bg, n_bg, replace=False)] = True
        self.case_index, self.slice_index = cidx[keep], sidx[keep]
        self.has_foreground = fg_all[keep] if need_fg else None

    def __len__(self) -> int:
        return len(self.case_index)

    def _slice(self, index: int) -> tuple[np.ndarray, np.ndarray | None, tuple[float, ...], float]:
        """Image ``(C, H, W)``, label ``(H, W)``, in-plane spacing and slice spacing, before resizing."""
        loaded = self.loader.load(self.cases[self.case_index[index]])
        spacing = tuple(loaded.spacing)
        if loaded.image.ndim == 3:
            return loaded.image, loaded.label, spacing, 1.0
        s = int(self.slice_index[index])
        image = np.take(loaded.image, s, axis=self.axis + 1)
        label = None if loaded.label is None else np.take(loaded.label, s, axis=self.axis)
        return image, label, tuple(v for a, v in enumerate(spacing) if a != self.axis), spacing[self.axis]

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label, spacing, slice_spacing = self._slice(index)
        if self.resize is not None and image.shape[1:] != self.resize:
            spacing = tuple(v * n / m for v, n, m in zip(spacing, image.shape[1:], self.resize, strict=True))
            image, label = _resize2d(image, label, self.resize)
        rng = self.rng()
        if self.patch_size is not None:
            starts = window_starts(image.shape[1:], self.patch_size, self.crop, rng)
            image = extract_window(image, starts, self.patch_size)
            label = None if label is None else extract_window(label, starts, self.patch_size)
        if self.transform is not None:
            image, label = self.transform(image, label, rng)
        sample = make_sample(image, label, self.cases[self.case_index[index]].case_id, spacing)
        sample["slice_index"] = int(self.slice_index[index])
        sample["slice_spacing"] = torch.tensor(float(slice_spacing), dtype=torch.float32)
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


class ImageDataset2D(SliceDataset2D):
    """2D image-folder cases (one image per case), resized and/or padded/cropped to a fixed size.

    >>> ds = ImageDataset2D(splits.train, loader, patch_size=(256, 256), resize=(288, 288))  # doctest: +SKIP
    >>> ds[0]["image"].shape  # torch.Size([3, 256, 256])  # doctest: +SKIP
    """

    def __init__(
        self,
        cases: Sequence[Case],
        loader: CaseLoader,
        patch_size: Sequence[int] | None = None,
        resize: Sequence[int] | None = None,
        transform: Any = None,
        crop: str = "random",
    ) -> None:
        if loader.spec.spatial_dims != 2:
            raise ValueError(
                f"ImageDataset2D needs a 2D dataset; {loader.spec.root} is {loader.spec.spatial_dims}D "
                "(use SliceDataset2D to slice volumes)"
            )
        super().__init__(cases, loader, patch_size=patch_size, transform=transform, crop=crop, resize=resize)


class PatchDataset(WorkerRandom, Dataset):
    """Random patches of ``patch_size`` with nnU-Net-style foreground oversampling (3D volumes, or 2D images).

    Each sample picks its case round-robin (``samples_per_case`` samples per case and epoch); with probability
    ``oversample_foreground`` (default 1/3) the patch is centred on a voxel of a randomly chosen foreground
    class present in the case, otherwise its position is uniform. Volumes smaller than the patch are padded
    (image 0, label 0 = background).

    >>> ds = PatchDataset(splits.train, loader, patch_size=(64, 64, 64))  # doctest: +SKIP
    >>> ds[0]["image"].shape, ds[0]["label"].shape  # doctest: +SKIP
    (torch.Size([1, 64, 64, 64]), torch.Size([64, 64, 64]))
    """

    def __init__(
        self,
        cases: Sequence[Case],
        loader: CaseLoader,
        patch_size: Sequence[int],
        samples_per_case: int = 1,
        oversample_foreground: float = 1 / 3,
        transform: Any = None,
    ) -> None:
        if len(patch_size) != loader.spec.spatial_dims:
            raise ValueError(
                f"patch_size {list(patch_size)} must have {loader.spec.spatial_dims} values "
                f"(the dataset is {loader.spec.spatial_dims}D)"
            )
        if not 0 <= oversample_foreground <= 1:
            raise ValueError(f"oversample_foreground must be in [0, 1], got {oversample_foreground}")
        if samples_per_case < 1:
            raise ValueError(f"samples_per_case must be >= 1, got {samples_per_case}")
        if not cases:
            raise ValueError("PatchDataset needs at least one case")
        self.cases = list(cases)
        self.loader = loader
        self.patch_size = tuple(int(s) for s in patch_size)
        self.samples_per_case = samples_per_case
        self.oversample_foreground = oversample_foreground
        self.transform: Transform | None = as_transform(transform)

    def __len__(self) -> int:
        return len(self.cases) * self.samples_per_case

    def __getitem__(self, index: int) -> dict[str, Any]:
        loaded = self.loader.load(self.cases[index % len(self.cases)])
        rng = self.rng()
        shape = loaded.image.shape[1:]
        starts = window_starts(shape, self.patch_size, "random", rng)
        if rng.random() < self.oversample_foreground:
            locations = loaded.foreground_locations()
            if locations:
                classes = sorted(locations)
                coords = locations[classes[int(rng.integers(len(classes)))]]
                centre = coords[int(rng.integers(len(coords)))]
                starts = [
                    int(np.clip(c - n // 2, min(0, d - n), max(0, d - n)))
                    for c, n, d in zip(centre, self.patch_size, shape, strict=True)
                ]
        image = extract_window(loaded.image, starts, self.patch_size)
        label = None if loaded.label is None else extract_window(loaded.label, starts, self.patch_size)
        if self.transform is not None:
            image, label = self.transform(image, label, rng)
        return make_sample(image, label, loaded.case_id, loaded.spacing)


class VolumeDataset(Dataset):
    """Whole cases for validation/test (batch size 1, sliding window), or central crops of ``crop_size``.

    ``pad_to_multiple`` pads each spatial axis at the end up to a multiple (e.g. ``2 ** depth`` for a UNet run
    on the whole volume; label padding is background).

    >>> ds = VolumeDataset(splits.val, loader, crop_size=(96, 96, 96))  # doctest: +SKIP
    >>> ds[0]["image"].shape  # torch.Size([1, 96, 96, 96])  # doctest: +SKIP
    """

    def __init__(
        self,
        cases: Sequence[Case],
        loader: CaseLoader,
        crop_size: Sequence[int] | None = None,
        pad_to_multiple: int | None = None,
    ) -> None:
        if crop_size is not None and len(crop_size) != loader.spec.spatial_dims:
            raise ValueError(f"crop_size {list(crop_size)} must have {loader.spec.spatial_dims} values")
        if pad_to_multiple is not None and pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
        self.cases = list(cases)
        self.loader = loader
        self.crop_size = None if crop_size is None else tuple(int(s) for s in crop_size)
        self.pad_to_multiple = pad_to_multiple

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        loaded = self.loader.load(case)
        image, label = loaded.image, loaded.label
        shape = image.shape[1:]
        size = self.crop_size
        if size is None and self.pad_to_multiple is not None:
            m = self.pad_to_multiple
            size = tuple(-(-d // m) * m for d in shape)
        if size is not None:
            rng = np.random.default_rng(0)  # unused by "center"
            starts = window_starts(shape, size, "center", rng) if self.crop_size else [0] * len(size)
            image = extract_window(image, starts, size)
            label = None if label is None else extract_window(label, starts, size)
        return make_sample(image, label, case.case_id, loaded.spacing)

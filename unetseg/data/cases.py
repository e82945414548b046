"""Cases as arrays: ``CaseLoader`` reads, resamples, normalizes and caches them; ``LoadedCase`` holds one.

Loading reads the files (lazily, on first use), resamples to ``target_spacing`` (optional, off by default:
``scipy.ndimage.zoom``, linear for images and nearest for labels, applied to the whole case before slicing or
cropping), normalizes per channel, then keeps, by ``cache``:

* ``none`` (the default): nothing but the most recent case per process: memory stays flat whatever the number
  of cases; each sample re-reads its case (cheap for small volumes, slow for large ``.nii.gz``);
* ``memory``: every loaded case (call ``preload`` before the DataLoader forks its workers, so that they share
  the arrays): fast, memory grows with the dataset;
* ``disk``: preprocessed arrays as ``.npy`` files in ``cache_dir``, memory-mapped when read: the first epoch
  writes them, later ones read only the voxels they need.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unetseg.data.formats.io import read_header, read_image, read_label
from unetseg.data.formats.layout import Case, DatasetSpec
from unetseg.data.normalize import ChannelNormalizer, build_normalization

CACHE_MODES: tuple[str, ...] = ("none", "memory", "disk")


def check_cache(cache: str, cache_dir: str | Path | None) -> None:
    """Raise unless ``cache`` is one of ``CACHE_MODES`` (``disk`` with a ``cache_dir``)."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {list(CACHE_MODES)}, got cache={cache!r}")
    if cache == "disk" and cache_dir is None:
        raise ValueError("cache='disk' needs cache_dir (a writable folder for the preprocessed .npy arrays)")


def check_target_spacing(
    target_spacing: float | Sequence[float] | None, spatial_dims: int | None = None
) -> tuple[float, ...] | None:
    """Positive spacing(s) as a tuple; with ``spatial_dims`` one value per axis (a single value is repeated).

    >>> check_target_spacing(1.5, spatial_dims=3)
    (1.5, 1.5, 1.5)
    """
    if target_spacing is None:
        return None
    values = (target_spacing,) if isinstance(target_spacing, int | float) else tuple(target_spacing)
    if not values or not all(isinstance(s, int | float) and s > 0 for s in values):
        raise ValueError(f"target_spacing={target_spacing!r}: expected positive numbers (mm)")
    if spatial_dims is not None and len(values) == 1:
        values = values * spatial_dims
    if spatial_dims is not None and len(values) != spatial_dims:
        raise ValueError(
            f"target_spacing={list(values)}: expected {spatial_dims} values (the spacing must have "
            f"{spatial_dims} values, one per axis of the dataset's {spatial_dims}D files, or one for all)"
        )
    return tuple(float(s) for s in values)


@dataclass
class LoadedCase:
    """A case as arrays: normalized ``image (C, *spatial) float32``, ``label (*spatial) int64`` / ``None``.

    >>> case = LoadedCase("c0", np.zeros((1, 4, 4), np.float32), np.zeros((4, 4), np.int64), (1.0, 1.0))
    >>> case.image.shape, case.spacing
    ((1, 4, 4), (1.0, 1.0))
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None


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


def _save_atomic(path: Path, write: Any) -> None:
    """Write ``path`` through a per-process temporary file and a rename (readers never see half a file)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


class CaseLoader:
    """Reads, resamples and normalizes cases on demand, with a ``memory`` or ``disk`` cache (or ``none``).

    >>> loader = CaseLoader(spec, normalization=None, cache="memory")  # doctest: +SKIP
    >>> loader.load(spec.cases_train[0]).image.shape  # (C, X, Y, Z)  # doctest: +SKIP
    (1, 35, 51, 35)
    """

    def __init__(
        self,
        spec: DatasetSpec,
        normalization: Any = None,
        target_spacing: Sequence[float] | None = None,
        cache: str = "none",
        cache_dir: str | Path | None = None,
    ) -> None:
        check_cache(cache, cache_dir)
        self.spec = spec
        self.normalizer = (
            normalization
            if isinstance(normalization, ChannelNormalizer)
            else build_normalization(normalization, spec)
        )
        self.target_spacing = check_target_spacing(target_spacing, spec.spatial_dims)
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
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
        names = ("image.npy", "label.npy", "meta.json")
        paths = {name: base.with_name(f"{base.name}_{name}") for name in names}
        if not paths["meta.json"].is_file():
            loaded = self._read(case)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for name, array in (("image.npy", loaded.image), ("label.npy", loaded.label)):
                if array is not None:
                    _save_atomic(paths[name], lambda tmp, array=array: np.save(tmp, array))
            affine = None if loaded.affine is None else np.asarray(loaded.affine).tolist()
            meta = json.dumps({"spacing": list(loaded.spacing), "affine": affine})
            _save_atomic(paths["meta.json"], lambda tmp: tmp.write_text(meta))
        meta = json.loads(paths["meta.json"].read_text())
        label = np.load(paths["label.npy"], mmap_mode="r") if paths["label.npy"].is_file() else None
        affine = None if meta["affine"] is None else np.asarray(meta["affine"])
        return LoadedCase(
            case.case_id, np.load(paths["image.npy"], mmap_mode="r"), label, tuple(meta["spacing"]), affine
        )

    def load(self, case: Case) -> LoadedCase:
        """The preprocessed case, from the cache when there is one."""
        loaded = self._memory.get(case.case_id) or self._recent.get(case.case_id)
        if loaded is not None:
            return loaded
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

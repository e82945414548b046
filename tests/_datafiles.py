"""Helpers that write small real datasets to disk (NIfTI via nibabel, PNG via Pillow, TIFF via tifffile).

Volumes are ``(X, Y, Z)``; the label has class 1 in a box over ``z in [3, 7)`` with class 2 inside it, so
slices along axis 2 outside ``[3, 7)`` are pure background. ``make_rare_msd`` adds a rare class 3: a 2 x 2
patch in the single slice ``z = RARE_Z`` of a few cases.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import tifffile
from PIL import Image

SHAPE: tuple[int, int, int] = (16, 12, 10)
FG_Z: tuple[int, int] = (3, 7)
RARE_Z = FG_Z[1]  # the rare class's slice: no other class there


def affine(
    spacing: Sequence[float] = (1.0, 1.0, 2.0), origin: Sequence[float] = (0.0, 0.0, 0.0)
) -> np.ndarray:
    """Diagonal affine with ``spacing`` and translation ``origin``."""
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def write_nifti(path: Path, array: np.ndarray, aff: np.ndarray | None = None) -> Path:
    """Write ``array`` as NIfTI (``.nii.gz`` / ``.nii`` by name), affine ``aff`` (default ``affine()``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine() if aff is None else aff), str(path))
    return path


def volume_label(shape: Sequence[int] = SHAPE, n_classes: int = 3) -> np.ndarray:
    """uint8 label: class 1 box in the middle z-slices ``FG_Z``, class 2 (if ``n_classes > 2``) inside it."""
    label = np.zeros(shape, dtype=np.uint8)
    x, y = shape[0], shape[1]
    label[x // 4 : 3 * x // 4, y // 4 : 3 * y // 4, FG_Z[0] : FG_Z[1]] = 1
    if n_classes > 2:
        label[x // 2 - 1 : x // 2 + 2, y // 2 - 1 : y // 2 + 2, FG_Z[0] + 1 : FG_Z[1] - 1] = 2
    return label


def volume_image(label: np.ndarray, seed: int, base: float = 100.0, step: float = 50.0) -> np.ndarray:
    """float32 image: ``base + step * label`` plus unit Gaussian noise."""
    rng = np.random.default_rng(seed)
    return (base + step * label + rng.normal(0, 1, label.shape)).astype(np.float32)


def make_msd(
    root: Path,
    n_cases: int = 4,
    modalities: Sequence[str] = ("MRI",),
    labels: Sequence[str] = ("background", "a", "b"),
    n_test: int = 1,
    shape: Sequence[int] = SHAPE,
    labels_ts: bool = False,
) -> Path:
    """An MSD task folder: ``dataset.json`` (index -> name labels), 3D or 4D (channels last) images."""
    training, test = [], []
    for i in range(n_cases + n_test):
        name = f"case_{i:03d}.nii.gz"
        label = volume_label(shape, len(labels))
        channels = [
            volume_image(label, seed=10 * i + c, base=100.0 * (c + 1)) for c in range(len(modalities))
        ]
        image = channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)
        if i < n_cases:
            write_nifti(root / "imagesTr" / name, image)
            write_nifti(root / "labelsTr" / name, label)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            write_nifti(root / "imagesTs" / name, image)
            if labels_ts:
                write_nifti(root / "labelsTs" / name, label)
            test.append(f"./imagesTs/{name}")
    meta = {
        "name": "Toy",
        "tensorImageSize": "4D" if len(modalities) > 1 else "3D",
        "modality": {str(i): m for i, m in enumerate(modalities)},
        "labels": {str(i): n for i, n in enumerate(labels)},
        "numTraining": n_cases,
        "numTest": n_test,
        "training": training,
        "test": test,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def make_nnunet(
    root: Path,
    n_cases: int = 4,
    channels: Sequence[str] = ("T2", "ADC"),
    labels: Sequence[str] = ("background", "a", "b"),
    n_test: int = 1,
    shape: Sequence[int] = SHAPE,
    labels_ts: bool = True,
    ending: str = ".nii.gz",
) -> Path:
    """An nnU-Net v2 raw folder: ``dataset.json`` (name -> index labels), one file per channel."""
    for i in range(n_cases + n_test):
        case = f"pt{i:03d}"
        label = volume_label(shape, len(labels))
        tr = i < n_cases
        for c in range(len(channels)):
            image = volume_image(label, seed=10 * i + c, base=100.0 * (c + 1))
            write_nifti(root / ("imagesTr" if tr else "imagesTs") / f"{case}_{c:04d}{ending}", image)
        if tr or labels_ts:
            write_nifti(root / ("labelsTr" if tr else "labelsTs") / f"{case}{ending}", label)
    meta = {
        "channel_names": {str(i): c for i, c in enumerate(channels)},
        "labels": {n: i for i, n in enumerate(labels)},
        "numTraining": n_cases,
        "file_ending": ending,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def make_rare_msd(
    root: Path, n_cases: int = 4, rare_cases: Sequence[int] = (0,), shape: Sequence[int] = SHAPE
) -> Path:
    """``make_msd`` with classes ``background, a, b, rare``: class 3 is a 2 x 2 patch in slice ``RARE_Z`` of
    the cases ``rare_cases`` only (2D slices along Z: 1 of ``n_cases * shape[2]`` slices per rare case)."""
    make_msd(root, n_cases=n_cases, labels=("background", "a", "b", "rare"), n_test=0, shape=shape)
    for i in rare_cases:
        label = volume_label(shape, 3)
        label[1:3, 1:3, RARE_Z] = 3
        write_nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", label)
    return root


def disk_mask(size: Sequence[int], seed: int) -> np.ndarray:
    """Binary uint8 mask {0, 1} of a disc at a random position."""
    rng = np.random.default_rng(seed)
    h, w = size
    cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
    yy, xx = np.mgrid[:h, :w]
    return (((yy - cy) ** 2 + (xx - cx) ** 2) <= (min(h, w) // 4) ** 2).astype(np.uint8)


def write_raster(path: Path, array: np.ndarray) -> Path:
    """Write a PNG/JPG (Pillow) or TIFF (tifffile) by the file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".tif", ".tiff"):
        tifffile.imwrite(str(path), array)
    else:
        Image.fromarray(array).save(path)
    return path


def make_folder2d(
    root: Path,
    n: int = 4,
    size: Sequence[int] = (20, 24),
    image_ext: str = ".png",
    mask_ext: str = ".png",
    mask_scale: int = 255,
    rgb: bool = True,
    subsets: Sequence[str] | None = None,
    mask_suffix: str = "",
    n_classes: int = 2,
) -> Path:
    """``images/`` + ``masks/`` (or ``<subset>/images`` ...): uint8 images, masks ``label * mask_scale``.

    ``n_classes > 2`` adds class ``k`` as a horizontal band (mask values are then indices, ``mask_scale=1``).
    """
    folders = [root] if subsets is None else [root / s for s in subsets]
    k = 0
    for folder in folders:
        for _ in range(n):
            label = disk_mask(size, seed=k)
            for cls in range(2, n_classes):
                label[cls * 2 : cls * 2 + 2, :] = cls
            rng = np.random.default_rng(100 + k)
            grey = (60 + 120 * (label > 0) + rng.integers(0, 40, size)).astype(np.uint8)
            image = np.stack([grey, grey // 2, 255 - grey], axis=-1) if rgb else grey
            stem = f"img{k:03d}"
            write_raster(folder / "images" / f"{stem}{image_ext}", image)
            write_raster(
                folder / "masks" / f"{stem}{mask_suffix}{mask_ext}", (label * mask_scale).astype(np.uint8)
            )
            k += 1
    return root

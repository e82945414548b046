"""2D image folders: ``images/`` + ``masks/`` with matching stems (Kvasir-SEG, ISIC, DRIVE-like sets).

Accepted trees (PNG, JPG, TIFF, BMP, GIF)::

    root/images/x.png  root/masks/x.png                  -> all cases are training cases
    root/train/images/ root/train/masks/  root/val/...   root/test/...   (test/masks/ optional)

A mask matches an image with the same stem, or the stem followed by one of ``MASK_SUFFIXES``
(``ISIC_0000000.jpg`` <-> ``ISIC_0000000_segmentation.png``). Case ids are the image stems and must be unique.

Classes: from an optional ``dataset.json`` with ``labels`` (``{"0": "background", "1": "polyp"}`` or
``{"background": 0, "polyp": 1}``), otherwise from the mask values. Masks are read as

* ``threshold``: JPEG masks (lossy, values smear around 0 and 255) -> ``> 127`` is class 1;
* ``binary255``: masks whose values are within ``{0, 255}`` -> ``{0, 1}``;
* ``index``: anything else, values are class indices ``0..K-1``. Without ``dataset.json`` the classes are
  named ``class_k`` and every index up to the largest value must occur in some mask: a gap (binary masks with
  one stray 7) is an error that names the stray values' files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from unetseg.data.formats.io import JPEG_ENDINGS, RASTER_ENDINGS, file_ending, read_array, read_header
from unetseg.data.formats.layout import (
    DATASET_JSON,
    Case,
    DatasetSpec,
    InvalidDatasetError,
    MissingDatasetFileError,
    any_label_map,
    labels_json_line,
    read_dataset_json,
)

MASK_SUFFIXES: tuple[str, ...] = ("_mask", "_segmentation", "_seg", "_label", "_labels", "_gt", "_anno")
SUBSETS: tuple[str, ...] = ("train", "val", "test")
logger = logging.getLogger(__name__)


def _rasters(folder: Path) -> list[Path]:
    """Visible raster files of ``folder``, sorted."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(RASTER_ENDINGS)
    )


def _mask_key(path: Path) -> str:
    """Stem of a mask with a known suffix (``_mask``, ``_segmentation``, ...) removed."""
    stem = path.stem
    for suffix in MASK_SUFFIXES:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _pair(images_dir: Path, masks_dir: Path, subset: str) -> list[Case]:
    """Cases of one subset: images paired with masks by stem; unpaired files become cases to flag."""
    masks = _rasters(masks_dir) if masks_dir.is_dir() else []
    by_stem = {m.stem: m for m in masks}
    by_key: dict[str, Path] = {}
    for mask in masks:
        key = _mask_key(mask)
        if key != mask.stem and key in by_stem:
            raise ValueError(f"masks {by_stem[key]} and {mask} both match image stem '{key}'; keep one")
        by_key[key] = mask
    label_required = subset != "test" or masks_dir.is_dir()
    meta = {"subset": subset, "label_dir": masks_dir, "label_required": label_required}
    cases = []
    used: set[Path] = set()
    for image in _rasters(images_dir):
        mask = by_stem.get(image.stem) or by_key.get(image.stem)
        if mask is not None:
            used.add(mask)
        cases.append(Case(image.stem, (image,), mask, dict(meta)))
    for mask in masks:  # masks without image
        if mask not in used:
            cases.append(Case(_mask_key(mask), (), mask, dict(meta)))
    return cases


def _mask_values(masks: list[Path], declared: list[str] | None) -> dict[int, Path]:
    """``{value: first mask holding it}`` over ``masks`` (stops at the first foreground with ``declared``)."""
    where: dict[int, Path] = {}
    for mask in masks:
        array = read_array(mask, is_mask=True)
        if not np.issubdtype(array.dtype, np.integer) and not np.array_equal(array, np.round(array)):
            raise ValueError(
                f"mask {mask} is not integer-valued (dtype {array.dtype}); expected label indices or 0/255"
            )
        for value in np.unique(array).tolist():
            where.setdefault(int(value), mask)
        if declared is not None and set(where) - {0}:
            break  # one mask with foreground is enough to tell 0/255 from indices
    return where


def _index_classes(where: dict[int, Path], json_path: Path) -> list[str]:
    """Class names of undeclared index masks; values must be ``0..K-1`` with every index present."""
    values = sorted(where)
    if values[0] < 0:
        raise ValueError(f"mask {where[values[0]]} has negative value {values[0]}; expected label indices")
    absent = sorted(set(range(values[-1] + 1)) - set(values))
    if absent:
        kept = ["background", *(f"class_{i}" for i in range(1, absent[0]))]
        stray = ", ".join(f"{v} in {where[v]}" for v in values if v > absent[0])
        raise InvalidDatasetError(
            f"the masks hold the values {values}, so labels {absent} never occur ({stray}); without a "
            f"dataset.json mask values must be the class indices 0..K-1: fix the stray mask values, or "
            f"declare the classes in {json_path} with the line {{{labels_json_line(kept)}}}"
        )
    if values[-1] == 1:
        return ["background", "foreground"]
    return ["background", *(f"class_{i}" for i in range(1, values[-1] + 1))]


def _classes_from_masks(
    cases: list[Case], declared: list[str] | None, json_path: Path
) -> tuple[list[str], str]:
    """(class names, label mode) from the mask files (all of them unless labels are declared)."""
    masks = [c.label for c in cases if c.label is not None and c.images]
    if any(m.name.lower().endswith(JPEG_ENDINGS) for m in masks):
        return (declared or ["background", "foreground"]), "threshold"
    where = _mask_values(masks, declared)
    if set(where) <= {0, 255} and 255 in where and (declared is None or len(declared) == 2):
        return (declared or ["background", "foreground"]), "binary255"
    if declared is not None:
        return declared, "index"
    if not set(where) - {0}:
        logger.warning("all %d masks are empty (only 0); assuming a binary task", len(masks))
        return ["background", "foreground"], "index"
    if 255 in where:
        others = sorted(set(where) - {0, 255})
        raise ValueError(
            f"mask {where[others[0]]} has values {[v for v in others if where[v] == where[others[0]]][:10]} "
            f"while mask {where[255]} has 255: expected label indices 0..K-1 or 0/255 binary masks; "
            "declare the labels in a dataset.json "
            '(e.g. {"labels": {"0": "background", "1": "a", "2": "b"}})'
        )
    return _index_classes(where, json_path), "index"


def _default_norm(image: Path) -> str:
    """``rgb`` (divide by 255) for 8-bit images, ``zscore`` otherwise (16-bit/float TIFF, 16-bit PNG)."""
    if file_ending(image) in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(str(image)) as tif:
            return "rgb" if tif.series[0].dtype == np.uint8 else "zscore"
    from PIL import Image

    with Image.open(image) as img:
        return "rgb" if img.mode in ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr") else "zscore"


def _subsets(root: Path) -> dict[str, list[Case]]:
    """Cases per subset (``train`` and optional ``val``/``test``) of a flat or split folder tree."""
    subsets = [s for s in SUBSETS if (root / s / "images").is_dir()]
    if (root / "images").is_dir():
        if subsets:
            raise ValueError(f"{root} has both images/ and {subsets[0]}/images/; use one layout")
        if not (root / "masks").is_dir():
            raise FileNotFoundError(
                f"masks folder not found: expected {root / 'masks'} next to {root / 'images'}"
            )
        return {"train": _pair(root / "images", root / "masks", "train")}
    if "train" not in subsets:
        raise FileNotFoundError(f"{root}: expected {root / 'train' / 'images'} (found {subsets} only)")
    return {s: _pair(root / s / "images", root / s / "masks", s) for s in subsets}


def _first_training_image(root: Path, train: list[Case]) -> Path:
    """The first training image; raises when there is none (an empty ``images/``), naming the folders."""
    first = next((c.images[0] for c in train if c.images), None)
    if first is not None:
        return first
    masks = [c.label for c in train if c.label is not None]
    if not masks:
        raise ValueError(f"no images found under {root}: expected PNG/JPG/TIFF/BMP/GIF files in images/")
    raise MissingDatasetFileError(
        f"no images in {masks[0].parent.parent / 'images'} but {len(masks)} mask(s) in {masks[0].parent} "
        f"(e.g. {masks[0].name}): put each image in images/ under its mask's name "
        f"({', '.join(RASTER_ENDINGS)})"
    )


def _check_unique_ids(groups: dict[str, list[Case]]) -> None:
    """Raise on two images (of any subsets) with the same stem."""
    seen: dict[str, Path] = {}
    for case in (c for cases in groups.values() for c in cases if c.images):
        if case.case_id in seen:
            raise ValueError(f"duplicate case id '{case.case_id}': {seen[case.case_id]} and {case.images[0]}")
        seen[case.case_id] = case.images[0]


def _declared_classes(json_path: Path) -> list[str] | None:
    """Class names of an optional ``dataset.json`` with ``labels`` (either direction), else ``None``."""
    if not json_path.is_file():
        return None
    data = read_dataset_json(json_path)
    return any_label_map(data, json_path) if "labels" in data else None


def parse_folder2d(root: Path) -> DatasetSpec:
    """Describe a 2D ``images/`` + ``masks/`` folder (reads image headers and, to count classes, masks)."""
    groups = _subsets(root)
    first = _first_training_image(root, groups["train"])
    _check_unique_ids(groups)
    json_path = root / DATASET_JSON
    all_cases = [c for cases in groups.values() for c in cases]
    class_names, label_mode = _classes_from_masks(all_cases, _declared_classes(json_path), json_path)
    header = read_header(first)
    in_channels = 1 if len(header.shape) == 2 else header.shape[-1]
    channel_names = (
        ["gray"]
        if in_channels == 1
        else (["R", "G", "B"] if in_channels == 3 else [f"channel_{i}" for i in range(in_channels)])
    )
    return DatasetSpec(
        root=root,
        layout="folder2d",
        class_names=class_names,
        in_channels=in_channels,
        channel_names=channel_names,
        cases_train=groups["train"],
        cases_val=groups.get("val", []),
        cases_test=groups.get("test", []),
        file_ending=file_ending(first),
        spatial_dims=2,
        default_normalization=[_default_norm(first)] * in_channels,
        label_mode=label_mode,
        name=root.name,
    )

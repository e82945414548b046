"""Medical Segmentation Decathlon layout: ``dataset.json`` + ``imagesTr/``, ``labelsTr/``, ``imagesTs/``.

``dataset.json`` (as distributed with ``TaskXX_Name``)::

    {"name": "Hippocampus", "modality": {"0": "MRI"},
     "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
     "training": [{"image": "./imagesTr/hippocampus_367.nii.gz",
                   "label": "./labelsTr/hippocampus_367.nii.gz"}],
     "test": ["./imagesTs/hippocampus_267.nii.gz"]}

Images with several modalities are 4D NIfTI ``(X, Y, Z, C)`` (e.g. BraTS); ``C`` must equal ``len(modality)``.
nnU-Net v1 raw folders (same ``dataset.json``, but ``imagesTr/CASE_0000.nii.gz`` files, one per modality) are
read too: a listed ``CASE.nii.gz`` that does not exist is replaced by its ``_XXXX`` channel files.
Test labels are paired from ``labelsTs/`` when that folder exists (the Decathlon does not ship them).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from unetseg.data.formats.io import NIFTI_ENDINGS, case_id_from_path, read_header
from unetseg.data.formats.layout import (
    DATASET_JSON,
    Case,
    DatasetSpec,
    default_normalization_for,
    read_dataset_json,
    require_keys,
)

FLAVOUR = "Medical Segmentation Decathlon (MSD)"
REQUIRED_KEYS: tuple[str, ...] = ("labels", "modality", "training")
logger = logging.getLogger(__name__)


def index_map(data: dict[str, Any], key: str, path: Path) -> list[str]:
    """``{"0": "a", "1": "b"}`` -> ``["a", "b"]``; keys must be the integers ``0..n-1``."""
    mapping = data[key]
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{path}: '{key}' must be a non-empty object of index -> name, got {mapping!r}")
    try:
        items = sorted((int(k), str(v)) for k, v in mapping.items())
    except ValueError as err:
        raise ValueError(f"{path}: '{key}' keys must be integer indices, got {list(mapping)}") from err
    indices = [i for i, _ in items]
    if indices != list(range(len(items))):
        raise ValueError(f"{path}: '{key}' indices must be 0..{len(items) - 1} without gaps, got {indices}")
    return [name for _, name in items]


def _resolve(root: Path, rel: str) -> Path:
    """A path of dataset.json (``./imagesTr/x.nii.gz``) relative to ``root``."""
    return Path(os.path.normpath(root / rel))


def _channel_files(image: Path, num_channels: int) -> tuple[Path, ...]:
    """``(image,)``, or nnU-Net v1's ``CASE_0000.nii.gz, ...`` when the listed ``CASE.nii.gz`` is absent."""
    if image.exists():
        return (image,)
    case_id = case_id_from_path(image)
    first = image.with_name(f"{case_id}_0000.nii.gz")
    if not first.exists():
        return (image,)
    return tuple(image.with_name(f"{case_id}_{c:04d}.nii.gz") for c in range(num_channels))


def parse_msd(root: Path) -> DatasetSpec:
    """Describe an MSD task folder (reads ``dataset.json`` and one label header)."""
    json_path = root / DATASET_JSON
    data = read_dataset_json(json_path)
    require_keys(data, REQUIRED_KEYS, json_path, FLAVOUR)
    class_names = index_map(data, "labels", json_path)
    channel_names = index_map(data, "modality", json_path)
    if not isinstance(data["training"], list):
        raise ValueError(f"{json_path}: 'training' must be a list of {{image, label}} objects")
    cases_train = []
    for i, entry in enumerate(data["training"]):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise ValueError(
                f"{json_path}: training[{i}] must be an object with keys 'image' and 'label', got {entry!r}"
            )
        image = _resolve(root, entry["image"])
        images = _channel_files(image, len(channel_names))
        cases_train.append(Case(case_id_from_path(image), images, _resolve(root, entry["label"])))
    cases_test = []
    labels_ts = root / "labelsTs"
    for rel in data.get("test", []):
        image = _resolve(root, rel if isinstance(rel, str) else rel.get("image", ""))
        label = labels_ts / image.name if labels_ts.is_dir() else None
        cases_test.append(
            Case(
                case_id_from_path(image),
                _channel_files(image, len(channel_names)),
                label if label and label.exists() else None,
            )
        )
    listed = {c.label.name for c in cases_train if c.label is not None}
    unlisted = (
        sorted(
            p.name
            for p in (root / "labelsTr").glob("*")
            if not p.name.startswith(".") and p.name not in listed
        )
        if (root / "labelsTr").is_dir()
        else []
    )
    if unlisted:
        logger.warning(
            "%s: %d label file(s) in labelsTr/ are not listed in 'training' and are ignored: %s",
            json_path,
            len(unlisted),
            unlisted[:10],
        )
    spatial_dims = 3
    first_label = next((c.label for c in cases_train if c.label is not None and c.label.is_file()), None)
    if first_label is not None and first_label.name.lower().endswith(NIFTI_ENDINGS):
        spatial_dims = len(read_header(first_label).shape)
    return DatasetSpec(
        root=root,
        layout="msd",
        class_names=class_names,
        in_channels=len(channel_names),
        channel_names=channel_names,
        cases_train=cases_train,
        cases_test=cases_test,
        file_ending=".nii.gz",
        spatial_dims=spatial_dims,
        default_normalization=default_normalization_for(channel_names),
        name=str(data.get("name", root.name)),
    )

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
    channel_files,
    default_normalization_for,
    index_map,
    read_dataset_json,
    require_keys,
)

FLAVOUR = "Medical Segmentation Decathlon (MSD)"
REQUIRED_KEYS: tuple[str, ...] = ("labels", "modality", "training")
logger = logging.getLogger(__name__)


def _resolve(root: Path, rel: str) -> Path:
    """A path of dataset.json (``./imagesTr/x.nii.gz``) relative to ``root``."""
    return Path(os.path.normpath(root / rel))


def _channel_files(image: Path, num_channels: int) -> tuple[Path, ...]:
    """``(image,)``, or nnU-Net v1's ``CASE_0000.nii.gz, ...`` when the listed ``CASE.nii.gz`` is absent."""
    if image.exists():
        return (image,)
    case_id = case_id_from_path(image)
    files = channel_files(image.parent, case_id, ".nii.gz", num_channels)
    return files if files[0].exists() else (image,)


def _training_cases(root: Path, data: dict[str, Any], json_path: Path, num_channels: int) -> list[Case]:
    """Cases of the ``training`` list: ``{image, label}`` objects with paths relative to ``root``."""
    if not isinstance(data["training"], list):
        raise ValueError(f"{json_path}: 'training' must be a list of {{image, label}} objects")
    cases = []
    for i, entry in enumerate(data["training"]):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise ValueError(
                f"{json_path}: training[{i}] must be an object with keys 'image' and 'label', got {entry!r}"
            )
        image = _resolve(root, entry["image"])
        images = _channel_files(image, num_channels)
        cases.append(Case(case_id_from_path(image), images, _resolve(root, entry["label"])))
    return cases


def _test_cases(root: Path, data: dict[str, Any], num_channels: int) -> list[Case]:
    """Cases of the ``test`` list, with their label from ``labelsTs/`` where it exists."""
    cases = []
    labels_ts = root / "labelsTs"
    for rel in data.get("test", []):
        image = _resolve(root, rel if isinstance(rel, str) else rel.get("image", ""))
        label = labels_ts / image.name if labels_ts.is_dir() else None
        cases.append(
            Case(
                case_id_from_path(image),
                _channel_files(image, num_channels),
                label if label and label.exists() else None,
            )
        )
    return cases


def _warn_unlisted_labels(root: Path, cases: list[Case], json_path: Path) -> None:
    """Log the label files of ``labelsTr/`` that the ``training`` list does not name (they are not used)."""
    if not (root / "labelsTr").is_dir():
        return
    listed = {c.label.name for c in cases if c.label is not None}
    unlisted = sorted(
        p.name for p in (root / "labelsTr").glob("*") if not p.name.startswith(".") and p.name not in listed
    )
    if unlisted:
        logger.warning(
            "%s: %d label file(s) in labelsTr/ are not listed in 'training' and are ignored: %s",
            json_path,
            len(unlisted),
            unlisted[:10],
        )


def parse_msd(root: Path) -> DatasetSpec:
    """Describe an MSD task folder (reads ``dataset.json`` and one label header)."""
    json_path = root / DATASET_JSON
    data = read_dataset_json(json_path)
    require_keys(data, REQUIRED_KEYS, json_path, FLAVOUR)
    class_names = index_map(data, "labels", json_path)
    channel_names = index_map(data, "modality", json_path)
    cases_train = _training_cases(root, data, json_path, len(channel_names))
    _warn_unlisted_labels(root, cases_train, json_path)
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
        cases_test=_test_cases(root, data, len(channel_names)),
        file_ending=".nii.gz",
        spatial_dims=spatial_dims,
        default_normalization=default_normalization_for(channel_names),
        name=str(data.get("name", root.name)),
    )

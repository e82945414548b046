"""Shared records and helpers of the dataset layouts: ``Case``, ``DatasetSpec``, the ``DatasetError`` family,
``dataset.json`` reading and label-map parsing. The parsers (``msd``, ``nnunet``, ``folder2d``) build on this
module; ``detect`` picks one of them for a folder. This module imports none of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASET_JSON = "dataset.json"


class DatasetError(Exception):
    """A problem with a dataset's files (the message names them); the CLI reports it and exits with 2."""


class InvalidDatasetError(DatasetError, ValueError):
    """Bad dataset content: labels out of range, image/mask shape mismatch, unreadable files, ..."""


class MissingDatasetFileError(DatasetError, FileNotFoundError):
    """A file the dataset needs is missing (an image without label, a label without image, ...)."""


@dataclass(frozen=True)
class Case:
    """One patient / image: its input file(s), its label file (or ``None``) and free-form metadata.

    ``images`` holds one path per file: a single (possibly 4D, channels last) NIfTI for MSD, one file per
    channel for nnU-Net (``CASE_0000``, ``CASE_0001``, ...), one raster image for 2D folders. A path that does
    not exist (e.g. the expected label of an image without one) is kept as is and reported by ``validate``.

    >>> case = Case("hip_001", (Path("imagesTr/hip_001.nii.gz"),), Path("labelsTr/hip_001.nii.gz"))
    >>> case.case_id, len(case.images)
    ('hip_001', 1)
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset folder holds: its layout, classes, input channels and cases.

    ``class_names[i]`` is the name of label index ``i`` (``class_names[0]`` is the background), so
    ``num_classes == len(class_names)``. ``cases_val`` is only non-empty for layouts with a predefined
    validation subset (``folder2d`` with a ``val/`` folder). ``default_normalization`` holds one normalization
    name per input channel, derived from the modality / channel names (see ``unetseg.data.normalize``).

    >>> spec = detect_layout("/data/Task04_Hippocampus")  # doctest: +SKIP
    >>> spec.layout, spec.class_names, spec.in_channels, spec.spatial_dims  # doctest: +SKIP
    ('msd', ['background', 'Anterior', 'Posterior'], 1, 3)
    """

    root: Path
    layout: str
    class_names: list[str]
    in_channels: int
    channel_names: list[str]
    cases_train: list[Case]
    cases_test: list[Case] = field(default_factory=list)
    cases_val: list[Case] = field(default_factory=list)
    file_ending: str = ".nii.gz"
    spatial_dims: int = 3
    default_normalization: list[str] = field(default_factory=list)
    label_mode: str = "index"
    name: str = ""

    @property
    def num_classes(self) -> int:
        """Number of classes including the background."""
        return len(self.class_names)

    @property
    def all_cases(self) -> list[Case]:
        """Training, predefined validation and test cases, in that order."""
        return [*self.cases_train, *self.cases_val, *self.cases_test]


def read_json(path: Path, missing: str) -> Any:
    """Parse a JSON file; ``FileNotFoundError(missing)`` when it is absent, other errors name the file (and
    the line/column for malformed JSON)."""
    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def read_dataset_json(path: Path) -> dict[str, Any]:
    """Parse ``dataset.json``; errors name the file (and the line/column for malformed JSON)."""
    data = read_json(path, f"dataset.json not found: expected {path}")
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def require_keys(data: dict[str, Any], keys: tuple[str, ...], path: Path, flavour: str) -> None:
    """Raise a ``ValueError`` naming the first key of ``keys`` missing from ``data``."""
    for key in keys:
        if key not in data:
            raise ValueError(
                f"{path}: missing key '{key}' required by the {flavour} dataset.json "
                f"(required: {list(keys)}; found: {sorted(data)})"
            )


def _names_by_index(items: list[tuple[int, str]], key: str, path: Path) -> list[str]:
    """Names sorted by index; the indices must be ``0..n-1`` without gaps."""
    items = sorted(items)
    indices = [i for i, _ in items]
    if indices != list(range(len(items))):
        raise ValueError(f"{path}: '{key}' indices must be 0..{len(items) - 1} without gaps, got {indices}")
    return [name for _, name in items]


def index_map(data: dict[str, Any], key: str, path: Path) -> list[str]:
    """MSD ``{"0": "a", "1": "b"}`` -> ``["a", "b"]``; keys must be the integers ``0..n-1``."""
    mapping = data[key]
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{path}: '{key}' must be a non-empty object of index -> name, got {mapping!r}")
    try:
        items = [(int(k), str(v)) for k, v in mapping.items()]
    except ValueError as err:
        raise ValueError(f"{path}: '{key}' keys must be integer indices, got {list(mapping)}") from err
    return _names_by_index(items, key, path)


def label_names(labels: object, path: Path) -> list[str]:
    """nnU-Net ``{"background": 0, "liver": 1}`` -> ``["background", "liver"]`` (indices ``0..n-1``)."""
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{path}: 'labels' must be a non-empty object of name -> index, got {labels!r}")
    items = []
    for name, index in labels.items():
        if isinstance(index, list | tuple):
            raise ValueError(
                f"{path}: region-based label '{name}': {index} is not supported; "
                "expected one integer index per label"
            )
        if isinstance(index, bool) or not str(index).lstrip("-").isdigit():
            raise ValueError(f"{path}: label '{name}' must map to an integer index, got {index!r}")
        items.append((int(index), str(name)))
    return _names_by_index(items, "labels", path)


def any_label_map(data: dict[str, Any], path: Path) -> list[str]:
    """Class names from ``labels`` written either way: index -> name (MSD) or name -> index (nnU-Net)."""
    labels = data["labels"]
    if isinstance(labels, dict) and all(str(k).isdigit() for k in labels):
        return index_map(data, "labels", path)
    return label_names(labels, path)


def labels_json_line(class_names: list[str]) -> str:
    """The ``dataset.json`` entry that declares ``class_names``: ``"labels": {"0": "background", ...}``."""
    return f'"labels": {json.dumps({str(i): name for i, name in enumerate(class_names)})}'


def strip_ending(name: str, endings: tuple[str, ...]) -> str:
    """File name without the first of ``endings`` it ends with (``.nii.gz`` before ``.gz``)."""
    for ending in sorted(endings, key=len, reverse=True):
        if name.endswith(ending):
            return name[: -len(ending)]
    return name


def channel_files(folder: Path, case_id: str, ending: str, count: int) -> tuple[Path, ...]:
    """nnU-Net channel files ``folder/CASE_0000<ending>, ..., CASE_{count-1}<ending>``."""
    return tuple(folder / f"{case_id}_{c:04d}{ending}" for c in range(count))


def default_normalization_for(channel_names: list[str]) -> list[str]:
    """Normalization name per channel from modality / nnU-Net channel names: CT -> ``ct``, else ``zscore``.

    nnU-Net's scheme names are honoured too: ``noNorm`` -> ``none``, ``rescale_to_0_1`` -> ``minmax``,
    ``rgb_to_0_1`` -> ``rgb``.
    """
    aliases = {
        "ct": "ct",
        "nonorm": "none",
        "rescale_to_0_1": "minmax",
        "rgb_to_0_1": "rgb",
        "zscore": "zscore",
    }
    return [aliases.get(name.strip().lower(), "zscore") for name in channel_names]


def check_root(root: Path) -> list[str]:
    """Raise if ``root`` is missing, not a folder or empty; return its visible entries."""
    if not root.exists():
        raise FileNotFoundError(f"dataset root does not exist: {root}")
    if not root.is_dir():
        raise ValueError(f"dataset root must be a folder, got a file: {root}")
    entries = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    if not entries:
        raise ValueError(f"dataset root is empty: {root}")
    return entries

"""Dataset records (``Case``, ``DatasetSpec``) and layout detection from a root folder.

``detect_layout(root)`` looks at the folder and dispatches to the parser of one of the registered layouts:

* ``msd``: Medical Segmentation Decathlon, ``dataset.json`` with ``training`` / ``labels`` (index -> name) /
  ``modality``; one (possibly 4D, channels last) NIfTI per case.
* ``nnunet``: nnU-Net v2 raw, ``dataset.json`` with ``channel_names`` / ``labels`` (name -> index) /
  ``file_ending``; one file per channel ``imagesTr/CASE_0000.nii.gz``, label ``labelsTr/CASE.nii.gz``.
* ``folder2d``: ``images/`` + ``masks/`` with matching stems (optionally in ``train/``, ``val/``, ``test/``).

Detection reads ``dataset.json`` and at most file headers (and, for ``folder2d`` without declared labels, the
mask values to count the classes); image data are read later, on demand. Per-case problems (a missing label,
a shape mismatch, ...) are not raised here but by ``validate``, so that ``skip_bad_cases`` can list them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASET_JSON = "dataset.json"


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


def strip_ending(name: str, endings: tuple[str, ...]) -> str:
    """File name without the first of ``endings`` it ends with (``.nii.gz`` before ``.gz``)."""
    for ending in sorted(endings, key=len, reverse=True):
        if name.endswith(ending):
            return name[: -len(ending)]
    return name


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


def _layout_parsers() -> dict[str, Callable[[Path], DatasetSpec]]:
    """Registry of layout name -> parser (imported late: the parsers import this module)."""
    from unetseg.data.formats.folder2d import parse_folder2d
    from unetseg.data.formats.msd import parse_msd
    from unetseg.data.formats.nnunet import parse_nnunet

    return {"msd": parse_msd, "nnunet": parse_nnunet, "folder2d": parse_folder2d}


LAYOUTS: tuple[str, ...] = ("msd", "nnunet", "folder2d")


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


def guess_layout(root: Path) -> str:
    """Name of the layout of ``root`` (see the module docstring); raises if none matches."""
    entries = check_root(root)
    if (root / "images").is_dir() or any(
        (root / sub / "images").is_dir() for sub in ("train", "val", "test")
    ):
        return "folder2d"
    json_path = root / DATASET_JSON
    if json_path.is_file():
        data = read_dataset_json(json_path)
        if "channel_names" in data:
            return "nnunet"
        if "training" in data or "modality" in data:
            return "msd"
        raise ValueError(
            f"{json_path}: cannot tell the dataset.json flavour: expected key 'channel_names' "
            f"(nnU-Net v2 raw) or 'training' and 'modality' (Medical Segmentation Decathlon); "
            f"found keys {sorted(data)}"
        )
    if (root / "imagesTr").is_dir():
        raise FileNotFoundError(
            f"dataset.json not found: expected {json_path} next to imagesTr/ (MSD or nnU-Net v2 raw layout)"
        )
    raise ValueError(
        f"cannot detect the dataset layout of {root}: expected dataset.json + imagesTr/ "
        f"(MSD or nnU-Net v2 raw) or images/ + masks/ folders (2D, optionally under train/ val/ test/); "
        f"found {entries[:20]}"
    )


def detect_layout(root: str | Path, layout: str | None = None) -> DatasetSpec:
    """Detect the layout of ``root`` (or use ``layout``) and describe the dataset without reading image data.

    >>> spec = detect_layout("/data/Task04_Hippocampus")  # doctest: +SKIP
    >>> spec.layout, spec.num_classes, len(spec.cases_train)  # doctest: +SKIP
    ('msd', 3, 260)
    """
    root = Path(root).expanduser()
    parsers = _layout_parsers()
    if layout is not None and layout not in parsers:
        raise ValueError(f"unknown dataset layout '{layout}'; expected one of {list(parsers)}")
    check_root(root)
    name = guess_layout(root) if layout is None else layout
    return parsers[name](root)

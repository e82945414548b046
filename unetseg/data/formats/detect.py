"""Layout detection: the registry of parsers and ``detect_layout(root)``, which picks one for a folder.

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

from collections.abc import Callable
from pathlib import Path

from unetseg.data.formats.folder2d import parse_folder2d
from unetseg.data.formats.layout import DATASET_JSON, DatasetSpec, check_root, read_dataset_json
from unetseg.data.formats.msd import parse_msd
from unetseg.data.formats.nnunet import parse_nnunet

PARSERS: dict[str, Callable[[Path], DatasetSpec]] = {
    "msd": parse_msd,
    "nnunet": parse_nnunet,
    "folder2d": parse_folder2d,
}
LAYOUTS: tuple[str, ...] = tuple(PARSERS)


def guess_layout(root: Path) -> str:
    """Name of the layout of ``root`` (see the module docstring); raises if none matches."""
    entries = check_root(root)
    if any((root / sub / "images").is_dir() for sub in (".", "train", "val", "test")):
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
    if layout is not None and layout not in PARSERS:
        raise ValueError(f"unknown dataset layout '{layout}'; expected one of {list(PARSERS)}")
    check_root(root)
    return PARSERS[guess_layout(root) if layout is None else layout](root)

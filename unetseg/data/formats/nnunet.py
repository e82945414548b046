"""nnU-Net v2 raw layout: ``dataset.json`` + ``imagesTr/CASE_XXXX<ending>``, ``labelsTr/CASE<ending>``.

``dataset.json``::

    {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "PZ": 1, "TZ": 2},
     "numTraining": 32, "file_ending": ".nii.gz"}

Each case has one file per channel (``_0000``, ``_0001``, ...; an RGB PNG counts as three channels). Test
cases come from ``imagesTs/`` and, where present, ``labelsTs/``. Region-based labels (a label mapped to a list
of indices) are not supported.
"""

from __future__ import annotations

import re
from pathlib import Path

from unetseg.data.formats.io import NIFTI_ENDINGS, SUPPORTED_ENDINGS, read_header
from unetseg.data.formats.layout import (
    DATASET_JSON,
    Case,
    DatasetSpec,
    channel_files,
    default_normalization_for,
    index_map,
    label_names,
    read_dataset_json,
    require_keys,
)

FLAVOUR = "nnU-Net v2 raw"
REQUIRED_KEYS: tuple[str, ...] = ("channel_names", "labels", "file_ending")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _group_cases(folder: Path, ending: str, num_channels: int) -> dict[str, tuple[Path, ...]]:
    """``{case_id: (CASE_0000<ending>, ...)}`` from ``folder`` (expected paths for missing files)."""
    found: dict[str, set[int]] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.name.startswith(".") or not path.name.endswith(ending):
            continue
        match = _CHANNEL_SUFFIX.match(path.name[: -len(ending)])
        if match is None:
            raise ValueError(
                f"image file {path} does not follow the nnU-Net naming CASE_XXXX{ending} "
                "(a four-digit channel index after the case id)"
            )
        found.setdefault(match["case"], set()).add(int(match["channel"]))
    groups = {}
    for case_id, channels in found.items():
        extra = sorted(c for c in channels if c >= num_channels)
        if extra:
            raise ValueError(
                f"{folder}: case {case_id} has channel file(s) {extra} but dataset.json declares "
                f"{num_channels} channel(s) in 'channel_names'"
            )
        # NIfTI: one file per channel; rasters: an RGB file holds three channels (counted by validate)
        count = num_channels if ending.lower() in NIFTI_ENDINGS else max(channels) + 1
        groups[case_id] = channel_files(folder, case_id, ending, count)
    return groups


def _cases(
    root: Path, images: str, labels: str, ending: str, num_channels: int, need_label: bool
) -> list[Case]:
    """Pair channel groups of ``images/`` with ``labels/CASE<ending>``; unpaired files get expected paths."""
    groups = _group_cases(root / images, ending, num_channels)
    label_dir = root / labels
    label_ids = (
        {p.name[: -len(ending)] for p in label_dir.glob(f"*{ending}") if not p.name.startswith(".")}
        if label_dir.is_dir()
        else set()
    )
    if not need_label and not label_ids:
        return [Case(cid, paths, None) for cid, paths in sorted(groups.items())]
    cases = [Case(cid, paths, label_dir / f"{cid}{ending}") for cid, paths in groups.items()]
    for cid in label_ids - set(groups):  # a label without image: the expected image paths are reported
        count = num_channels if ending.lower() in NIFTI_ENDINGS else 1
        images_of_label = channel_files(root / images, cid, ending, count)
        cases.append(Case(cid, images_of_label, label_dir / f"{cid}{ending}"))
    return sorted(cases, key=lambda c: c.case_id)


def parse_nnunet(root: Path) -> DatasetSpec:
    """Describe an nnU-Net v2 raw dataset folder (reads ``dataset.json`` and one label header)."""
    json_path = root / DATASET_JSON
    data = read_dataset_json(json_path)
    require_keys(data, REQUIRED_KEYS, json_path, FLAVOUR)
    channel_names = index_map(data, "channel_names", json_path)
    class_names = label_names(data["labels"], json_path)
    ending = str(data["file_ending"])
    if ending.lower() not in SUPPORTED_ENDINGS:
        raise ValueError(
            f"{json_path}: file_ending '{ending}' is not supported; expected one of "
            f"{list(SUPPORTED_ENDINGS)} (.mha/.nrrd need SimpleITK: convert them to .nii.gz)"
        )
    if not (root / "imagesTr").is_dir():
        raise FileNotFoundError(
            f"nnU-Net dataset {root}: folder imagesTr/ not found: expected {root / 'imagesTr'}"
        )
    cases_train = _cases(root, "imagesTr", "labelsTr", ending, len(channel_names), need_label=True)
    cases_test = _cases(root, "imagesTs", "labelsTs", ending, len(channel_names), need_label=False)
    spatial_dims = 2
    if ending.lower() in NIFTI_ENDINGS:
        first_label = next((c.label for c in cases_train if c.label is not None and c.label.is_file()), None)
        spatial_dims = len(read_header(first_label).shape) if first_label is not None else 3
    return DatasetSpec(
        root=root,
        layout="nnunet",
        class_names=class_names,
        in_channels=len(channel_names),
        channel_names=channel_names,
        cases_train=cases_train,
        cases_test=cases_test,
        file_ending=ending,
        spatial_dims=spatial_dims,
        default_normalization=default_normalization_for(channel_names),
        name=str(data.get("name", root.name)),
    )

"""``validate``: find every bad case before training starts, raise naming the files, or skip and log them.

Checks per case (headers only, cheap): files exist (an image without label, a label without image), files
are readable, channel count matches the spec, image and label shapes agree, NIfTI affines agree. With
``check_data`` the voxel data are read too: labels must be integer-valued within the declared labels, images
must decode fully (truncated files) and be finite; a constant image (all zeros, say) is logged as a warning,
or is an error when its label has foreground.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from unetseg.data.formats.io import (
    RASTER_ENDINGS,
    FileHeader,
    image_channels,
    read_header,
    read_image,
    read_label,
)
from unetseg.data.formats.layout import (
    Case,
    DatasetError,
    DatasetSpec,
    InvalidDatasetError,
    MissingDatasetFileError,
)

__all__ = ["DatasetError", "InvalidDatasetError", "MissingDatasetFileError", "case_problems", "validate"]
logger = logging.getLogger(__name__)
MAX_LISTED = 20
AFFINE_RTOL = 1e-4
AFFINE_ATOL = 1e-3

Problem = tuple[type[Exception], str]


def _fmt_affine(affine: np.ndarray) -> str:
    """An affine on one line, 3 decimals."""
    return np.array2string(np.asarray(affine), precision=3, suppress_small=True, separator=",").replace(
        "\n", ""
    )


def _missing_label_message(case: Case) -> str:
    """Why an image has no label, with where the label was expected."""
    image = case.images[0]
    if case.label is not None:
        return f"image {image} has no label: expected {case.label}"
    folder = case.meta.get("label_dir", "the labels folder")
    return (
        f"image {image} has no mask: expected a file named {case.case_id}.<png|tif|jpg|...> "
        f"(or {case.case_id}_mask.<ext>, ...) in {folder}"
    )


def _file_problems(case: Case, label_required: bool) -> list[Problem]:
    """A missing image (or label, when required or named): the files that should exist and do not."""
    missing_images = [p for p in case.images if not p.is_file()]
    has_label = case.label is not None and case.label.is_file()
    if not case.images or missing_images:
        expected = missing_images[0] if missing_images else f"an image named {case.case_id}.<ext>"
        if has_label:
            return [(FileNotFoundError, f"label {case.label} has no image: expected {expected}")]
        return [(FileNotFoundError, f"case {case.case_id}: image file not found: {expected}")]
    if not has_label and (label_required or case.label is not None):
        return [(FileNotFoundError, _missing_label_message(case))]
    return []


def _shape_problem(ref: FileHeader, header: FileHeader, is_label: bool, spatial_dims: int) -> str | None:
    """Why ``header`` does not fit the first image ``ref`` (axes, shape, affine), or ``None``."""
    spatial, other = ref.shape[:spatial_dims], header.shape[:spatial_dims]
    raster = header.path.name.lower().endswith(RASTER_ENDINGS)  # RGB-stored masks are collapsed on read
    if is_label and len(header.shape) != spatial_dims and not raster:
        return (
            f"label {header.path} has shape {header.shape}; expected "
            f"{spatial_dims} axes matching image {ref.path} {spatial}"
        )
    if other != spatial:
        return f"image {ref.path} shape {spatial} and {header.path} shape {other} disagree"
    if (
        ref.affine is not None
        and header.affine is not None
        and not np.allclose(ref.affine, header.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL)
    ):
        return (
            f"image {ref.path} affine {_fmt_affine(ref.affine)} and {header.path} "
            f"affine {_fmt_affine(header.affine)} disagree"
        )
    return None


def _header_problems(case: Case, spec: DatasetSpec) -> list[Problem]:
    """Unreadable headers, a wrong channel count, images/label of different shapes or affines."""
    has_label = case.label is not None and case.label.is_file()
    headers: list[FileHeader] = []
    for path in (*case.images, *([case.label] if has_label else [])):
        try:
            headers.append(read_header(path))
        except (OSError, ValueError) as err:
            return [(ValueError, str(err))]
    images, label = headers[: len(case.images)], (headers[-1] if has_label else None)
    try:
        channels = sum(image_channels(h, spec.spatial_dims) for h in images)
    except ValueError as err:
        return [(ValueError, str(err))]
    problems: list[Problem] = []
    if channels != spec.in_channels:
        problems.append(
            (
                ValueError,
                f"image {case.images[0]} has {channels} channel(s); expected "
                f"{spec.in_channels} ({spec.channel_names})",
            )
        )
    for header in [*images[1:], *([label] if label else [])]:
        message = _shape_problem(images[0], header, header is label, spec.spatial_dims)
        if message is not None:
            problems.append((ValueError, message))
    return problems


def _data_problems(case: Case, spec: DatasetSpec) -> list[Problem]:
    """Voxel-level problems: undecodable files, NaN/inf, labels outside the declared classes, blank images.

    A constant image channel (every voxel one value, e.g. an all-zero export) is an error when the case's
    label has foreground (nothing in the image shows it) and a logged warning otherwise.
    """
    try:
        image, _ = read_image(case, spec)
        if not np.isfinite(image).all():
            return [(ValueError, f"image {case.images[0]} contains NaN or infinite values")]
        label = read_label(case, spec)
    except (OSError, ValueError) as err:
        return [(ValueError, str(err))]
    flat = image.reshape(image.shape[0], -1)
    constant = np.flatnonzero(flat.min(axis=1) == flat.max(axis=1)).tolist()
    if not constant:
        return []
    one_file_per_channel = len(case.images) == len(image)
    what = ", ".join(
        f"{case.images[c if one_file_per_channel else 0]} (channel {c}: every voxel {flat[c, 0]:g})"
        for c in constant
    )
    if label is not None and label.any():
        return [
            (
                ValueError,
                f"image {what} is constant but its label {case.label} has foreground: the image file is "
                "probably a blank export; replace it, or drop the case (data.skip_bad_cases: true)",
            )
        ]
    logger.warning("image %s is constant: it carries no information; check the file", what)
    return []


def case_problems(case: Case, spec: DatasetSpec, check_data: bool, label_required: bool) -> list[Problem]:
    """Everything wrong with one case (empty list if it is fine); voxel data are read with ``check_data``."""
    problems = _file_problems(case, label_required) or _header_problems(case, spec)
    if problems or not check_data:
        return problems
    return _data_problems(case, spec)


def validate(spec: DatasetSpec, check_data: bool = True, skip_bad_cases: bool = False) -> DatasetSpec:
    """Check every case of ``spec``; raise on the first problems found, or drop bad cases and log each one.

    Returns ``spec`` itself when all cases are fine, else (with ``skip_bad_cases``) a copy without the bad
    cases. The error lists up to ``MAX_LISTED`` problems, each naming the file and what was expected; it is a
    :class:`MissingDatasetFileError` (a ``FileNotFoundError``) when every problem is a missing file, else an
    :class:`InvalidDatasetError` (a ``ValueError``); both are :class:`DatasetError`.

    >>> spec = validate(detect_layout("/data/Task04_Hippocampus"), check_data=True)  # doctest: +SKIP
    """
    if not spec.cases_train:
        raise InvalidDatasetError(f"no training cases found in {spec.root} ({spec.layout} layout)")
    bad: dict[tuple[str, str], list[Problem]] = {}
    subsets = {"cases_train": spec.cases_train, "cases_val": spec.cases_val, "cases_test": spec.cases_test}
    for subset, cases in subsets.items():
        for case in cases:
            required = subset != "cases_test" or bool(case.meta.get("label_required", False))
            problems = case_problems(case, spec, check_data, required)
            if problems:
                bad[(subset, case.case_id)] = problems
    if not bad:
        return spec
    messages = [msg for problems in bad.values() for _, msg in problems]
    if not skip_bad_cases:
        kinds = {kind for problems in bad.values() for kind, _ in problems}
        kind: type[Exception] = (
            MissingDatasetFileError if kinds == {FileNotFoundError} else InvalidDatasetError
        )
        if len(messages) == 1:
            raise kind(messages[0])
        listed = "\n".join(f"  - {m}" for m in messages[:MAX_LISTED])
        more = f"\n  ... and {len(messages) - MAX_LISTED} more" if len(messages) > MAX_LISTED else ""
        raise kind(
            f"{len(messages)} problems in dataset {spec.root} (pass skip_bad_cases=True to skip these "
            f"cases):\n{listed}{more}"
        )
    for (_, case_id), problems in bad.items():
        for _, msg in problems:
            logger.warning("skipping case %s: %s", case_id, msg)
    kept = {name: [c for c in cases if (name, c.case_id) not in bad] for name, cases in subsets.items()}
    logger.warning("skipped %d bad case(s) of %s: %s", len(bad), spec.root, sorted(cid for _, cid in bad))
    if not kept["cases_train"]:
        raise InvalidDatasetError(
            f"no valid training cases left in {spec.root} after skipping {len(bad)} bad case(s)"
        )
    return dataclasses.replace(spec, **kept)

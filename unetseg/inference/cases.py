"""Input cases and output masks of ``python -m unetseg.inference.predict``.

``find_cases`` groups the files of a folder into cases (nnU-Net channel files ``<case>_0000.nii.gz``, ...),
``read_case`` reads one as ``(C, *spatial)`` with its spacing and the reference for the output geometry, and
``write_mask`` writes a mask of class indices: NIfTI with the input's affine and header, or a palette PNG
(mode ``P``: the pixel values are the class indices, and the palette colours them for image viewers).

>>> class_palette(4).tolist()  # background black, then the PASCAL VOC colour map
[[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unetseg.data.formats.io import (
    NIFTI_ENDINGS,
    SUPPORTED_ENDINGS,
    case_id_from_path,
    file_ending,
    read_array,
)

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class InputCase:
    """One case to segment: its id (output name) and its files, one per channel group, in channel order."""

    case_id: str
    files: list[Path]

    @property
    def is_nifti(self) -> bool:
        return file_ending(self.files[0]) in NIFTI_ENDINGS


def _image_files(folder: Path) -> list[Path]:
    """The files of ``folder`` with a supported ending, sorted; hidden files left out."""
    files = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            try:
                file_ending(path)
            except ValueError:
                continue
            files.append(path)
    return files


def find_cases(path: str | Path) -> list[InputCase]:
    """The cases of a file or folder; in a folder where every file name ends in ``_NNNN`` (nnU-Net channel
    files), files sharing the part before it form one case. Raises naming the path if there is nothing."""
    path = Path(path)
    if path.is_file():
        file_ending(path)  # raises for unsupported types, naming the file
        return [InputCase(case_id_from_path(path), [path])]
    if not path.is_dir():
        raise FileNotFoundError(f"input not found: {path}")
    files = _image_files(path)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(SUPPORTED_ENDINGS)}) in {path}")
    matches = [CHANNEL_SUFFIX.match(case_id_from_path(f)) for f in files]
    if all(matches):
        cases: dict[str, list[Path]] = {}
        channels = sorted((m["channel"], m["case"], f) for f, m in zip(files, matches, strict=True) if m)
        for _, case_id, f in channels:
            cases.setdefault(case_id, []).append(f)
        return [InputCase(case_id, cases[case_id]) for case_id in sorted(cases)]
    return [InputCase(case_id_from_path(f), [f]) for f in files]


def _read_file(path: Path, nifti: bool, spatial_dims: int) -> tuple[np.ndarray, tuple[float, ...], Any]:
    """One file of a case: ``(*spatial, C)`` float32, its spacing and its geometry reference."""
    array = np.asarray(read_array(path), dtype=np.float32)
    if nifti:
        import nibabel as nib

        reference = nib.load(str(path))
        spatial = 2 if array.ndim == 2 else 3  # (X, Y), (X, Y, Z) or (X, Y, Z, C)
        spacing = tuple(float(z) for z in reference.header.get_zooms()[:spatial])
    else:
        if spatial_dims == 3:
            raise ValueError(f"{path}: a 2D image cannot be segmented by a 3D model")
        spatial, spacing, reference = 2, (1.0, 1.0), array.shape[:2]
    if array.ndim not in (spatial, spatial + 1):
        raise ValueError(f"{path}: shape {array.shape} is not {spatial}D (optionally with channels last)")
    return (array[..., None] if array.ndim == spatial else array), spacing, reference


def read_case(
    case: InputCase, spatial_dims: int, in_channels: int
) -> tuple[np.ndarray, tuple[float, ...], Any]:
    """``(image (C, *spatial) float32, spacing, reference)`` for a ``spatial_dims``-D model with
    ``in_channels`` inputs; the reference is the first NIfTI image (nibabel) or the raster's ``(H, W)``.
    Raises naming the file for unreadable or mismatching files.

    NIfTI arrays are ``(X, Y)``, ``(X, Y, Z)`` or ``(X, Y, Z, C)``; rasters ``(H, W)`` or ``(H, W, C)``.
    """
    nifti = case.is_nifti
    parts: list[np.ndarray] = []
    spacing, reference = None, None
    for path in case.files:
        if (file_ending(path) in NIFTI_ENDINGS) != nifti:
            raise ValueError(f"{path}: case {case.case_id} mixes NIfTI and raster files")
        array, file_spacing, file_reference = _read_file(path, nifti, spatial_dims)
        if parts and array.shape[:-1] != parts[0].shape[:-1]:
            raise ValueError(
                f"{path}: shape {array.shape[:-1]} differs from {case.files[0]} {parts[0].shape[:-1]}"
            )
        parts.append(array)
        spacing = file_spacing if spacing is None else spacing
        reference = file_reference if reference is None else reference
    image = np.moveaxis(np.concatenate(parts, axis=-1), -1, 0)
    if image.shape[0] != in_channels:
        raise ValueError(
            f"{case.files[0]}: {image.shape[0]} channel(s) ({len(case.files)} file(s), shape "
            f"{parts[0].shape[:-1]}); the model expects {in_channels}"
        )
    return np.ascontiguousarray(image), tuple(spacing or ()), reference


def class_palette(num_colours: int = 256) -> np.ndarray:
    """``(num_colours, 3)`` uint8, one distinct colour per class index: the PASCAL VOC colour map (0 black,
    1 dark red, 2 green, 3 olive, 4 navy, ...), whose bits spread the index over R, G and B."""
    index = np.arange(num_colours)
    palette = np.zeros((num_colours, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8)


def write_mask(mask: np.ndarray, case: InputCase, reference: Any, output_dir: str | Path) -> Path:
    """Write the uint8 mask of ``case`` into ``output_dir``: ``<case>.nii.gz`` with the geometry of the
    NIfTI ``reference`` (affine, qform/sform and their codes, voxel sizes), else a palette ``<case>.png``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if case.is_nifti:
        import nibabel as nib

        header = reference.header.copy()
        header.set_data_dtype(np.uint8)
        out = type(reference)(mask, reference.affine, header)
        out.set_qform(reference.get_qform(), code=int(reference.header["qform_code"]))
        out.set_sform(reference.get_sform(), code=int(reference.header["sform_code"]))
        out.header.set_slope_inter(1.0, 0.0)
        path = output_dir / f"{case.case_id}.nii.gz"
        nib.save(out, str(path))
        return path
    from PIL import Image

    image = Image.fromarray(np.asarray(mask, dtype=np.uint8))
    image.putpalette(class_palette().tobytes())  # an "L" image becomes "P" with the same pixel values
    path = output_dir / f"{case.case_id}.png"
    image.save(path)
    return path

"""Reading image and label files (NIfTI via nibabel, PNG/JPG/GIF/BMP via Pillow, TIFF via tifffile).

Every failure is re-raised as ``FileNotFoundError`` / ``ValueError`` naming the file. Arrays keep the storage
order: NIfTI volumes are ``(X, Y, Z[, C])`` (no reorientation), rasters are ``(H, W[, C])``; ``read_case``
turns them into ``image (C, *spatial) float32`` and ``label (*spatial) int64``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unetseg.data.formats.layout import Case, DatasetSpec, strip_ending

NIFTI_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii")
RASTER_ENDINGS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
SUPPORTED_ENDINGS: tuple[str, ...] = NIFTI_ENDINGS + RASTER_ENDINGS
JPEG_ENDINGS: tuple[str, ...] = (".jpg", ".jpeg")
_TIFF_ENDINGS = (".tif", ".tiff")
_RGB_MODES = ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")


@dataclass(frozen=True)
class FileHeader:
    """Shape (channels last, if any), affine (NIfTI only) and voxel spacing of a file, without its data."""

    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray | None
    spacing: tuple[float, ...]


def file_ending(path: Path) -> str:
    """The supported ending of ``path`` (``.nii.gz``, ``.png``, ...), lower-cased; raises if unsupported."""
    name = path.name.lower()
    for ending in sorted(SUPPORTED_ENDINGS, key=len, reverse=True):
        if name.endswith(ending):
            return ending
    raise ValueError(f"unsupported file type: {path} (supported endings: {list(SUPPORTED_ENDINGS)})")


def case_id_from_path(path: Path) -> str:
    """File name without its (double) extension: ``imagesTr/la_003.nii.gz`` -> ``la_003``."""
    return strip_ending(path.name, SUPPORTED_ENDINGS + tuple(e.upper() for e in SUPPORTED_ENDINGS))


def _existing(path: Path) -> tuple[Path, str]:
    """``(path, its supported ending)``; a ``FileNotFoundError`` naming ``path`` when it is no file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    return path, file_ending(path)


def _tiff_to_hwc(array: np.ndarray) -> np.ndarray:
    """TIFF to ``(H, W[, C])``: a small leading axis (<= 4) followed by a large one is channels."""
    if array.ndim == 3 and array.shape[0] <= 4 < array.shape[-1]:
        return np.moveaxis(array, 0, -1)
    return array


def read_header(path: Path) -> FileHeader:
    """Shape, affine and spacing of ``path`` without reading the voxel data (cheap for NIfTI and rasters)."""
    path, ending = _existing(path)
    try:
        if ending in NIFTI_ENDINGS:
            import nibabel as nib

            img = nib.load(str(path))
            shape = tuple(int(s) for s in img.shape)
            if len(shape) == 5 and shape[3] == 1:  # ITK vector images: (X, Y, Z, 1, C)
                shape = shape[:3] + shape[4:]
            zooms = tuple(float(z) for z in img.header.get_zooms()[: min(len(shape), 3)])
            return FileHeader(path, shape, np.asarray(img.affine, dtype=np.float64), zooms)
        if ending in _TIFF_ENDINGS:
            import tifffile

            with tifffile.TiffFile(str(path)) as tif:
                shape = tuple(int(s) for s in tif.series[0].shape)
            if len(shape) == 3 and shape[0] <= 4 < shape[-1]:
                shape = (shape[1], shape[2], shape[0])
            return FileHeader(path, shape, None, (1.0, 1.0))
        from PIL import Image

        with Image.open(path) as img:
            width, height = img.size
            channels = 3 if img.mode in _RGB_MODES else 1
        shape = (height, width) if channels == 1 else (height, width, channels)
        return FileHeader(path, shape, None, (1.0, 1.0))
    except Exception as err:  # nibabel/PIL/tifffile raise many types: re-raise one, naming the file
        raise ValueError(f"cannot read {path}: {type(err).__name__}: {err}") from err


def read_array(path: Path, is_mask: bool = False) -> np.ndarray:
    """Voxel data of ``path`` in storage dtype (NIfTI scaling applied), rasters as ``(H, W[, C])``.

    Masks (``is_mask``) come back 2D for rasters: palette images give their indices, RGB masks must have equal
    channels (grey stored as RGB, e.g. Kvasir-SEG) and JPEG masks are read as greyscale.
    """
    path, ending = _existing(path)
    try:
        if ending in NIFTI_ENDINGS:
            import nibabel as nib

            array = np.asanyarray(nib.load(str(path)).dataobj)
            if array.ndim == 5 and array.shape[3] == 1:
                array = array[:, :, :, 0, :]
        elif ending in _TIFF_ENDINGS:
            import tifffile

            array = _tiff_to_hwc(np.asarray(tifffile.imread(str(path))))
        else:
            from PIL import Image

            with Image.open(path) as img:
                if is_mask and ending in JPEG_ENDINGS:
                    img = img.convert("L")
                elif img.mode in _RGB_MODES:
                    img = img.convert("RGB")
                elif img.mode == "LA":
                    img = img.convert("L")
                elif img.mode == "P" and not is_mask:
                    img = img.convert("RGB")
                elif img.mode == "1":
                    img = img.convert("L")
                array = np.asarray(img)
    except Exception as err:  # truncated gzip, bad header, broken PNG, ...: name the file
        raise ValueError(f"cannot read {path}: {type(err).__name__}: {err}") from err
    if is_mask and array.ndim == 3 and ending in RASTER_ENDINGS:
        if not all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, array.shape[-1])):
            raise ValueError(
                f"mask {path} has {array.shape[-1]} different colour channels; expected a single-channel "
                "mask of label indices (or 0/255), or grey stored as RGB"
            )
        array = array[..., 0]
    return array


def image_channels(header: FileHeader, spatial_dims: int) -> int:
    """Channels in one image file: 1 if it has ``spatial_dims`` axes, the last axis if it has one more."""
    if len(header.shape) == spatial_dims:
        return 1
    if len(header.shape) == spatial_dims + 1:
        return header.shape[-1]
    raise ValueError(
        f"image {header.path} has shape {header.shape}; expected {spatial_dims} spatial axes "
        f"(optionally followed by a channel axis)"
    )


def convert_label(array: np.ndarray, path: Path, spec: DatasetSpec) -> np.ndarray:
    """Check a label array (integer values, declared labels) and map it to class indices (int64).

    ``spec.label_mode``: ``index`` keeps values (must lie in ``0..num_classes-1``), ``binary255`` maps
    ``{0, 255}`` to ``{0, 1}``, ``threshold`` (JPEG masks, lossy) maps ``> 127`` to 1.
    """
    if spec.label_mode == "threshold":
        return (array > 127).astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.bool_):
        rounded = np.round(array)
        if not np.array_equal(rounded, array):
            bad = np.unique(array[rounded != array])[:5]
            raise ValueError(f"label {path} is not integer-valued: found values {bad.tolist()}")
        array = rounded
    values = np.unique(array)
    if spec.label_mode == "binary255":
        allowed = np.array([0, 255])
        bad = np.setdiff1d(values, allowed)
        if bad.size:
            raise ValueError(
                f"mask {path} has values {bad[:10].astype(np.int64).tolist()} outside {{0, 255}} "
                "(the dataset's masks are 0/255 binary)"
            )
        return (array > 0).astype(np.int64)
    bad = values[(values < 0) | (values >= spec.num_classes)]
    if bad.size:
        raise ValueError(
            f"label {path} has values {bad[:10].astype(np.int64).tolist()} outside the declared labels "
            f"0..{spec.num_classes - 1} ({spec.class_names})"
        )
    return array.astype(np.int64)


def read_image(case: Case, spec: DatasetSpec) -> tuple[np.ndarray, FileHeader]:
    """Image of ``case`` as ``(C, *spatial) float32`` (files concatenated on channels), first header."""
    if not case.images:
        raise FileNotFoundError(f"case {case.case_id} has no image file (label: {case.label})")
    parts = []
    for path in case.images:
        array = read_array(path)
        if array.ndim == spec.spatial_dims:
            array = array[..., None]
        elif array.ndim != spec.spatial_dims + 1:
            raise ValueError(
                f"image {path} has shape {array.shape}; expected {spec.spatial_dims} spatial axes "
                "(optionally followed by a channel axis)"
            )
        parts.append(np.asarray(array, dtype=np.float32))
    shapes = {p.shape[:-1] for p in parts}
    if len(shapes) > 1:
        raise ValueError(
            f"channel files of case {case.case_id} disagree in shape: "
            + ", ".join(f"{path} {p.shape[:-1]}" for path, p in zip(case.images, parts, strict=True))
        )
    image = np.moveaxis(np.concatenate(parts, axis=-1), -1, 0)
    if image.shape[0] != spec.in_channels:
        raise ValueError(
            f"case {case.case_id} ({case.images[0]}) has {image.shape[0]} channels; "
            f"expected {spec.in_channels} ({spec.channel_names})"
        )
    return np.ascontiguousarray(image), read_header(case.images[0])


def read_label(case: Case, spec: DatasetSpec) -> np.ndarray | None:
    """Label of ``case`` as ``(*spatial) int64`` class indices, or ``None`` if the case has no label."""
    if case.label is None:
        return None
    return convert_label(read_array(case.label, is_mask=True), case.label, spec)

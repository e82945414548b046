"""Dataset layouts on disk (MSD, nnU-Net v2 raw, 2D image folders): detection, reading and validation.

``layout`` holds the shared records (``Case``, ``DatasetSpec``, ``DatasetError``) and helpers, ``io`` reads
files, ``msd`` / ``nnunet`` / ``folder2d`` parse one layout each, ``detect`` picks the parser for a folder and
``validate`` checks every case. Imports point one way: layout <- io <- parsers <- detect.

>>> spec = validate(detect_layout("/data/Task04_Hippocampus"))  # doctest: +SKIP
>>> image, header = read_image(spec.cases_train[0], spec)  # (C, X, Y, Z) float32  # doctest: +SKIP
"""

from unetseg.data.formats.detect import LAYOUTS, detect_layout
from unetseg.data.formats.io import FileHeader, read_array, read_header, read_image, read_label
from unetseg.data.formats.layout import (
    Case,
    DatasetError,
    DatasetSpec,
    InvalidDatasetError,
    MissingDatasetFileError,
)
from unetseg.data.formats.validate import validate

__all__ = [
    "LAYOUTS",
    "Case",
    "DatasetError",
    "DatasetSpec",
    "FileHeader",
    "InvalidDatasetError",
    "MissingDatasetFileError",
    "detect_layout",
    "read_array",
    "read_header",
    "read_image",
    "read_label",
    "validate",
]

"""Dataset layouts on disk (MSD, nnU-Net v2 raw, 2D image folders): detection, reading and validation.

>>> spec = validate(detect_layout("/data/Task04_Hippocampus"))  # doctest: +SKIP
>>> image, header = read_image(spec.cases_train[0], spec)  # (C, X, Y, Z) float32  # doctest: +SKIP
"""

from unetseg.data.formats.io import FileHeader, read_array, read_header, read_image, read_label
from unetseg.data.formats.layout import LAYOUTS, Case, DatasetSpec, detect_layout
from unetseg.data.formats.validate import validate

__all__ = [
    "LAYOUTS",
    "Case",
    "DatasetSpec",
    "FileHeader",
    "detect_layout",
    "read_array",
    "read_header",
    "read_image",
    "read_label",
    "validate",
]

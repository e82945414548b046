"""Data: the built-in synthetic data, dataset folders (MSD, nnU-Net v2, 2D) and ``SegmentationDataModule``.

``formats`` reads and validates dataset folders; ``cases`` loads (resamples, normalizes, caches) one case;
``sampling`` decides where training samples come from (class-aware oversampling, windows); ``datasets``
turns cases into samples; ``datamodule`` wires them into Lightning loaders. ``splits``, ``normalize``,
``transforms`` and ``preprocessing`` are shared helpers. This package imports nothing else from ``unetseg``.
"""

from unetseg.data.datamodule import SegmentationDataModule, case_ids
from unetseg.data.formats import Case, DatasetSpec, detect_layout, validate
from unetseg.data.splits import Splits, make_splits
from unetseg.data.synthetic import CLASS_NAMES, SyntheticSegmentation

__all__ = [
    "CLASS_NAMES",
    "Case",
    "DatasetSpec",
    "SegmentationDataModule",
    "Splits",
    "SyntheticSegmentation",
    "case_ids",
    "detect_layout",
    "make_splits",
    "validate",
]

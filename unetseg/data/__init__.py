"""Data: the built-in synthetic data, dataset folders (MSD, nnU-Net v2, 2D) and ``SegmentationDataModule``."""

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

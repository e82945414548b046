"""Data: the built-in synthetic dataset and the ``SegmentationDataModule`` that serves it."""

from unetseg.data.datamodule import SegmentationDataModule
from unetseg.data.synthetic import CLASS_NAMES, SyntheticSegmentation

__all__ = ["CLASS_NAMES", "SegmentationDataModule", "SyntheticSegmentation"]

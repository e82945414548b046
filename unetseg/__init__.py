"""unetseg: medical image segmentation with a UNet whose long and short skip connections are configurable."""

from unetseg.data import SegmentationDataModule
from unetseg.module import SegmentationModule
from unetseg.nets import UNet

__all__ = ["SegmentationDataModule", "SegmentationModule", "UNet"]
__version__ = "0.1.0"

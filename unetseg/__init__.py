"""unetseg: medical image segmentation with a UNet whose long and short skip connections are configurable.

The public classes are imported on first access (PEP 562), so ``import unetseg`` and the standalone
``python -m unetseg.compat.torchvision_cpu_shim`` do not import torch or Lightning.

>>> import unetseg
>>> unetseg.UNet.__name__
'UNet'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unetseg.data import SegmentationDataModule
    from unetseg.nets import UNet
    from unetseg.training import SegmentationModule

__all__ = ["SegmentationDataModule", "SegmentationModule", "UNet"]
__version__ = "0.1.0"

_EXPORTS = {
    "SegmentationDataModule": "unetseg.data",
    "SegmentationModule": "unetseg.training",
    "UNet": "unetseg.nets",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'unetseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

"""Inference: whole-image logits (sliding window, flip TTA), prediction of new files and model export.

``inferer`` is pure PyTorch + MONAI and is what validation and test use inside training; ``predict`` and
``export`` load a trained checkpoint and run or export its net (``python -m unetseg.inference.predict``,
``python -m unetseg.inference.export``). Only the inferer is imported here, so training can use it without
loading the command-line tools.
"""

from unetseg.inference.inferer import Inferer, as_inferer, flip_tta

__all__ = ["Inferer", "as_inferer", "flip_tta"]

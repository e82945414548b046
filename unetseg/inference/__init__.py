"""Inference: whole-image logits (sliding window, flip TTA), checkpoint loading, prediction and export.

``inferer`` is pure PyTorch + MONAI and is what validation and test use inside training; ``checkpoint``
rebuilds a trained net with its class names, inference settings and preprocessing from a ``.ckpt`` file alone
(no Lightning; ``SegmentationModule.load_for_inference`` builds on it); ``predict`` and ``export`` are the
command-line tools (``python -m unetseg.inference.predict``, ``python -m unetseg.inference.export``), with
``cases`` reading their input files and writing the masks. This subpackage may import ``nets`` and ``data``,
never ``training``: training imports the inferer and the checkpoint reader from here. Only those two are
imported here, so training does not load the command-line tools.
"""

from unetseg.inference.checkpoint import CheckpointModel
from unetseg.inference.inferer import Inferer, as_inferer, flip_tta

__all__ = ["CheckpointModel", "Inferer", "as_inferer", "flip_tta"]

"""Training: the LightningModule, the command line, run logging, checkpoint files and Trainer callbacks.

Everything Lightning-specific about fitting a net lives here: ``SegmentationModule`` (loss, optimizer,
metrics, logging), ``cli`` (LightningCLI: configs, links, fit then test), ``loggers`` (CSV + W&B),
``checkpointing`` (atomic saves, ``--resume``) and ``callbacks`` (memory format, exact distributed
evaluation).
It may import ``nets``, ``data``, ``inference`` (the inferer, checkpoint reading), ``plan`` (``--config
auto``), ``losses`` and ``metrics``; nothing below it imports training.
"""

from unetseg.training.module import SegmentationModule

__all__ = ["SegmentationModule"]

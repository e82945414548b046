"""Evaluation: per-case metrics (Dice, IoU, HD95, ASD in physical units) and image/label/prediction overlays.

Each Lightning callback sits beside the logic it calls: ``PerCaseEvaluation`` in ``per_case`` (the test-set
CSV + summary), ``SegmentationOverlays`` in ``overlays`` (W&B images and PNG files). It imports no other
``unetseg`` subpackage: callbacks reach the model and data only through the Trainer.
"""

from unetseg.evaluation.overlays import SegmentationOverlays
from unetseg.evaluation.per_case import PerCaseEvaluation, case_metrics

__all__ = ["PerCaseEvaluation", "SegmentationOverlays", "case_metrics"]

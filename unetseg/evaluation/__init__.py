"""Evaluation: per-case metrics (Dice, IoU, HD95, ASD in physical units) and image/label/prediction overlays.

Each Lightning callback sits beside the logic it calls: ``PerCaseEvaluation`` in ``per_case`` (the test-set
``per_case.csv`` and its ``summary.json``, aggregated by ``aggregate_over_cases``), ``SegmentationOverlays``
in ``overlays`` (W&B images and PNG files). It imports no other ``unetseg`` subpackage (only third-party
libraries): callbacks reach the model and data only through the Trainer, so training and analysis can use
it without a cycle.
"""

from unetseg.evaluation.overlays import SegmentationOverlays
from unetseg.evaluation.per_case import PerCaseEvaluation, case_metrics

__all__ = ["PerCaseEvaluation", "SegmentationOverlays", "case_metrics"]

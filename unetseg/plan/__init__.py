"""Planning: a training configuration derived from the dataset, as nnU-Net plans its experiments.

``fingerprint`` reads the training cases once (shapes, spacings, intensities, class frequencies and in how
many slices/cases each class appears); ``rules`` turns the fingerprint into planned values, each with its
reason; ``overlay`` writes them as a YAML config overlay with the reasons as comments. The command lines are
``python -m unetseg.plan --data.root DIR`` (write the overlay) and ``python train.py --config auto
--data.root DIR`` (plan, then train with the plan). It imports ``unetseg.data`` only.
"""

from unetseg.plan.fingerprint import Fingerprint, dataset_fingerprint
from unetseg.plan.overlay import plan_dataset
from unetseg.plan.rules import Choice, Plan, make_plan

__all__ = [
    "Choice",
    "Fingerprint",
    "Plan",
    "dataset_fingerprint",
    "make_plan",
    "plan_dataset",
]

"""Dice and IoU per class, from torchmetrics, with one convention for empty classes.

Convention (stated in the README): both metrics are *global* over a stage (validation or test set):
per class, true/false positives and false negatives are summed over every voxel of every image, then
``Dice = 2TP / (2TP + FP + FN)`` and ``IoU = TP / (TP + FP + FN)``. A class absent from both prediction and
ground truth over the whole set has an undefined score (NaN) and is left out of the mean. The mean
(``val/dice``) excludes the background unless ``include_background=True``. States are integer counts
summed across processes, so the values are exact under DDP and under mixed precision.
"""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassF1Score, MulticlassJaccardIndex


def segmentation_metrics(num_classes: int) -> MetricCollection:
    """Per-class Dice and IoU (vectors of length ``num_classes``) for index predictions and labels."""
    return MetricCollection(
        {
            # global F1 over pixels is Dice (2TP / (2TP + FP + FN)); ~14x faster to update than DiceScore
            "dice": MulticlassF1Score(
                num_classes=num_classes,
                average="none",
                multidim_average="global",
                zero_division=float("nan"),
                validate_args=False,
            ),
            "iou": MulticlassJaccardIndex(
                num_classes=num_classes, average="none", zero_division=float("nan"), validate_args=False
            ),
        },
        compute_groups=False,
    )


def to_logged_scalars(
    per_class: dict[str, torch.Tensor], class_names: list[str], include_background: bool = False
) -> dict[str, torch.Tensor]:
    """Turn ``{"val/dice": tensor[C], ...}`` into the logged scalars ``val/dice`` (the mean over the reported
    classes, NaN left out) and ``val/dice/<class>``; the background only if ``include_background``.

    >>> out = to_logged_scalars({"val/dice": torch.tensor([0.9, 0.5, float("nan")])}, ["bg", "a", "b"])
    >>> {k: round(float(v), 2) for k, v in out.items()}
    {'val/dice': 0.5, 'val/dice/a': 0.5, 'val/dice/b': nan}
    """
    first = 0 if include_background else 1
    out: dict[str, torch.Tensor] = {}
    for key, values in per_class.items():
        values = values.float()
        reported = values[first:]
        out[key] = reported.nanmean() if reported.numel() else values.new_tensor(float("nan"))
        for name, value in zip(class_names[first:], reported, strict=True):
            out[f"{key}/{name}"] = value
    return out

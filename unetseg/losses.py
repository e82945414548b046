"""Segmentation losses by name, from MONAI, behind one calling convention.

Every loss takes raw logits ``(B, C, *spatial)`` and integer labels ``(B, *spatial)`` and is computed in
float32 whatever the autocast dtype of the logits, so mixed precision cannot overflow the reductions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.losses import DiceCELoss, DiceLoss, FocalLoss
from torch import nn


def _with_channel(loss: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Adapt a MONAI loss that expects ``(B, 1, *spatial)`` targets."""
    return lambda logits, label: loss(logits, label.unsqueeze(1))


# ``dice_ce`` and ``dice``: Dice terms exclude the background and pool the batch (nnU-Net's "batch dice"),
# stable when a class is absent from one image of the batch. ``dice_ce_bg`` pools the batch with the
# background in; ``dice_ce_image`` is MONAI's default DiceCELoss (per image, background in). Which one
# learns every class of the real-MRI benchmark fastest is measured in docs/planning.md.
LOSSES: dict[str, Callable[[], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "dice_ce": lambda: _with_channel(
        DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    ),
    "dice_ce_bg": lambda: _with_channel(
        DiceCELoss(include_background=True, to_onehot_y=True, softmax=True, batch=True)
    ),
    "dice_ce_image": lambda: _with_channel(
        DiceCELoss(include_background=True, to_onehot_y=True, softmax=True)
    ),
    "dice": lambda: _with_channel(
        DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    ),
    "ce": lambda: nn.CrossEntropyLoss(),
    "focal": lambda: _with_channel(FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0)),
}


class SegmentationLoss(nn.Module):
    """A named segmentation loss (``dice_ce``, ``dice_ce_bg``, ``dice_ce_image``, ``dice``, ``ce``, ``focal``)
    evaluated in float32.

    >>> loss = SegmentationLoss("dice_ce")
    >>> loss(torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))).shape
    torch.Size([])
    """

    def __init__(self, name: str = "dice_ce") -> None:
        super().__init__()
        if name not in LOSSES:
            raise ValueError(f"loss={name!r} is not one of {sorted(LOSSES)}")
        self.name = name
        self.fn = LOSSES[name]()

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self.fn(logits.float(), label.long())

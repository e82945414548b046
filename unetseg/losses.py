"""Segmentation losses by name, from MONAI, behind one calling convention, and deep supervision over them.

Every loss takes raw logits ``(B, C, *spatial)`` and integer labels ``(B, *spatial)`` and is computed in
float32 whatever the autocast dtype of the logits, so mixed precision cannot overflow the reductions.
:class:`DeepSupervisionLoss` takes a list of logits at decreasing resolutions (a deep-supervised net's
training output) and weighs the loss of each against the labels resized to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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


def deep_supervision_weights(num_outputs: int, exclude_lowest: bool = False) -> list[float]:
    """nnU-Net's loss weights of ``num_outputs`` outputs, full resolution first: ``1 / 2**i``, normalised
    to sum 1; with ``exclude_lowest`` the lowest resolution gets weight 0 (nnU-Net's nets output the level
    next to the bottleneck and exclude it this way; :class:`~unetseg.nets.UNet` does not build it).

    >>> deep_supervision_weights(3)
    [0.5714285714285714, 0.2857142857142857, 0.14285714285714285]
    >>> deep_supervision_weights(3, exclude_lowest=True)
    [0.6666666666666666, 0.3333333333333333, 0.0]
    """
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"num_outputs={num_outputs!r} must be a positive integer")
    if exclude_lowest and num_outputs < 2:
        raise ValueError("exclude_lowest=True needs at least 2 outputs (else every weight is 0)")
    weights = [1.0 / 2**i for i in range(num_outputs)]
    if exclude_lowest:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def downsample_label(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Integer labels ``(B, *spatial)`` resized to ``size`` by nearest neighbour without interpolating values:
    output index ``j`` of a dimension reads input index ``floor((j + 0.5) * n_in / n_out)`` (PyTorch's
    ``nearest-exact``, as nnU-Net resizes its deep-supervision targets): the centre of each 2x2 block at half
    resolution.

    >>> downsample_label(torch.arange(8).reshape(1, 8), [4])
    tensor([[1, 3, 5, 7]])
    """
    if len(size) != label.ndim - 1:
        raise ValueError(
            f"size {list(size)} must have one entry per spatial dim of labels {tuple(label.shape)}"
        )
    for dim, (n_in, n_out) in enumerate(zip(label.shape[1:], size, strict=True)):
        if n_in != n_out:
            source = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out)  # on the CPU
            index = source.floor().long().clamp_max(n_in - 1).to(label.device)
            label = label.index_select(dim + 1, index)
    return label


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over the outputs of a deep-supervised net, with the labels resized to each.

    ``forward(outputs, label)``: ``outputs`` is a list of logits ``(B, C, *spatial_i)``, full resolution
    first (``spatial_0`` is the label's size), as :class:`~unetseg.nets.UNet` with ``deep_supervision=True``
    returns in training mode; output ``i`` is compared with the labels resized to ``spatial_i`` by
    :func:`downsample_label`. A single tensor is passed to ``loss`` unchanged.

    Args:
        loss: ``(logits, label) -> scalar``, e.g. :class:`SegmentationLoss`.
        weights: one weight per output, normalised to sum 1; ``None``: nnU-Net's ``1 / 2**i`` for as many
            outputs as given (:func:`deep_supervision_weights`). Outputs of weight 0 are not computed (their
            heads then get no gradient).

    >>> loss = DeepSupervisionLoss(SegmentationLoss("ce"))
    >>> logits = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    >>> loss(logits, torch.randint(0, 3, (2, 16, 16))).shape
    torch.Size([])
    """

    def __init__(
        self,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if weights is not None:
            weights = [float(w) for w in weights]
            if not weights or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"weights={weights!r} must be finite, >= 0 and not all 0")
            weights = [w / sum(weights) for w in weights]
        self.loss = loss
        self.weights = weights

    def level_weights(self, num_outputs: int) -> list[float]:
        """The normalised weight of each of ``num_outputs`` outputs."""
        if self.weights is None:
            return deep_supervision_weights(num_outputs)
        if len(self.weights) != num_outputs:
            raise ValueError(
                f"DeepSupervisionLoss has {len(self.weights)} weights but the net returned "
                f"{num_outputs} outputs"
            )
        return self.weights

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, label)
        if not outputs or tuple(outputs[0].shape[2:]) != tuple(label.shape[1:]):
            shapes = [tuple(o.shape) for o in outputs]
            raise ValueError(
                "deep supervision: the first output must have the labels' spatial size "
                f"{tuple(label.shape[1:])}, got outputs of shapes {shapes}"
            )
        terms = [
            w * self.loss(out, downsample_label(label, out.shape[2:]))
            for w, out in zip(self.level_weights(len(outputs)), outputs, strict=True)
            if w > 0
        ]
        return torch.stack(terms).sum()

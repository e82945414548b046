"""Inference over whole images: sliding windows with Gaussian or constant blending, optional flip TTA.

Validation, test and ``python -m unetseg.inference.predict`` use the same ``Inferer``; training always runs
the plain forward on its patches. Logits are blended (not probabilities), as nnU-Net and MONAI do.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from monai.inferers import sliding_window_inference
from torch import Tensor

BLEND_MODES: tuple[str, ...] = ("gaussian", "constant")


def _positive_int(value: Any) -> bool:
    """True for an int (not a bool) > 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class Inferer:
    """Logits of a net over a whole image ``(B, C, *spatial)``: one forward pass or sliding windows.

    With ``roi_size`` set, windows of that size are run ``sw_batch_size`` at a time with ``overlap`` (fraction
    of the window shared by neighbours) and blended with ``mode``: ``"gaussian"`` weights each window's logits
    by a Gaussian of std ``sigma_scale * roi_size`` centred on the window (borders count less), ``"constant"``
    averages them (MONAI's ``sliding_window_inference``; images smaller than the window are zero-padded).
    ``roi_size=None`` runs the net on the whole image at once. ``flip_tta`` averages the logits over all
    ``2 ** spatial_dims`` combinations of flipped spatial axes (flip, predict, flip back). ``output_device``
    (e.g. ``"cpu"``) is where the blended output is accumulated: large volumes on a small GPU.

    >>> import torch
    >>> net = torch.nn.Conv2d(1, 3, kernel_size=1)
    >>> Inferer(roi_size=(32, 32), overlap=0.5)(net, torch.rand(2, 1, 80, 50)).shape
    torch.Size([2, 3, 80, 50])
    """

    roi_size: int | list[int] | None = None
    overlap: float = 0.5
    mode: str = "gaussian"
    sigma_scale: float = 0.125
    sw_batch_size: int = 4
    flip_tta: bool = False
    output_device: str | None = None

    def __post_init__(self) -> None:
        if self.roi_size is not None:
            sizes = [self.roi_size] if isinstance(self.roi_size, int) else list(self.roi_size)
            if not sizes or not all(_positive_int(s) for s in sizes):
                raise ValueError(f"roi_size={self.roi_size!r} must be a positive int or a list of them")
            self.roi_size = self.roi_size if isinstance(self.roi_size, int) else sizes
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap={self.overlap!r} must be in [0, 1)")
        if self.mode not in BLEND_MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {list(BLEND_MODES)}")
        if not self.sigma_scale > 0:
            raise ValueError(f"sigma_scale={self.sigma_scale!r} must be > 0")
        if not _positive_int(self.sw_batch_size):
            raise ValueError(f"sw_batch_size={self.sw_batch_size!r} must be a positive int")

    def config(self) -> dict[str, Any]:
        """The constructor arguments (stored in checkpoints; ``Inferer(**config)`` rebuilds it)."""
        return asdict(self)

    def window(self, spatial_dims: int) -> list[int] | None:
        """``roi_size`` as one size per spatial axis, or ``None`` for whole-image inference."""
        if self.roi_size is None:
            return None
        if isinstance(self.roi_size, int):
            return [self.roi_size] * spatial_dims
        if len(self.roi_size) != spatial_dims:
            raise ValueError(
                f"roi_size={self.roi_size} has {len(self.roi_size)} entries; the image has {spatial_dims} "
                "spatial axes"
            )
        return list(self.roi_size)

    def _predict(self, net: Callable[[Tensor], Tensor], image: Tensor) -> Tensor:
        """Logits without TTA: one forward pass or blended sliding windows."""
        window = self.window(image.ndim - 2)
        if window is None:
            return net(image)
        logits = sliding_window_inference(
            image,
            roi_size=window,
            sw_batch_size=self.sw_batch_size,
            predictor=net,
            overlap=self.overlap,
            mode=self.mode,
            sigma_scale=self.sigma_scale,
            device=self.output_device,
        )
        return logits.as_tensor() if hasattr(logits, "as_tensor") else logits  # MetaTensor -> Tensor

    def __call__(self, net: Callable[[Tensor], Tensor], image: Tensor) -> Tensor:
        if image.ndim < 3:
            raise ValueError(f"image must be (B, C, *spatial), got shape {tuple(image.shape)}")
        if not self.flip_tta:
            return self._predict(net, image)
        return flip_tta(lambda x: self._predict(net, x), image)


def flip_axes(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes of a ``(B, C, *spatial)`` tensor, the empty one first."""
    axes = range(2, 2 + spatial_dims)
    return [combo for r in range(spatial_dims + 1) for combo in itertools.combinations(axes, r)]


def flip_tta(predict: Callable[[Tensor], Tensor], image: Tensor) -> Tensor:
    """Mean of ``flip(predict(flip(image, axes)), axes)`` over every subset of the spatial axes."""
    combos = flip_axes(image.ndim - 2)
    total: Tensor | None = None
    for axes in combos:
        out = predict(image.flip(axes)).flip(axes) if axes else predict(image)
        total = out.float() if total is None else total + out.float()
    assert total is not None
    return total / len(combos)


def as_inferer(value: Inferer | dict[str, Any] | None) -> Inferer | None:
    """An ``Inferer`` from itself, its ``config()`` dict (checkpoints) or ``None``."""
    if value is None or isinstance(value, Inferer):
        return value
    if isinstance(value, dict):
        return Inferer(**value)
    raise TypeError(
        f"inference must be an Inferer, a dict of its arguments or None, got {type(value).__name__}"
    )

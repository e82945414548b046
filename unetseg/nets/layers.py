"""Dimension-generic layer lookups (2D/3D) and small name registries with early validation."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

SPATIAL_DIMS = (2, 3)


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise ``ValueError`` naming ``value`` and the allowed options unless ``value`` is one of them."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def _by_dims(spatial_dims: int, classes: dict[int, type[nn.Module]]) -> type[nn.Module]:
    """Return the class for ``spatial_dims`` from a ``{2: ..., 3: ...}`` table."""
    check_choice("spatial_dims", spatial_dims, SPATIAL_DIMS)
    return classes[spatial_dims]


def conv_cls(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return _by_dims(spatial_dims, {2: nn.Conv2d, 3: nn.Conv3d})


def conv_transpose_cls(spatial_dims: int) -> type[nn.Module]:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    return _by_dims(spatial_dims, {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d})


def maxpool_cls(spatial_dims: int) -> type[nn.Module]:
    """``nn.MaxPool2d`` or ``nn.MaxPool3d``."""
    return _by_dims(spatial_dims, {2: nn.MaxPool2d, 3: nn.MaxPool3d})


def dropout_cls(spatial_dims: int) -> type[nn.Module]:
    """Channel dropout: ``nn.Dropout2d`` or ``nn.Dropout3d``."""
    return _by_dims(spatial_dims, {2: nn.Dropout2d, 3: nn.Dropout3d})


def group_count(num_channels: int, max_groups: int = 8) -> int:
    """Largest divisor of ``num_channels`` that is at most ``max_groups`` (8 for any multiple of 8)."""
    return max(g for g in range(1, min(max_groups, num_channels) + 1) if num_channels % g == 0)


def _batch_norm(num_channels: int, spatial_dims: int) -> nn.Module:
    """BatchNorm2d/3d."""
    return _by_dims(spatial_dims, {2: nn.BatchNorm2d, 3: nn.BatchNorm3d})(num_channels)


def _instance_norm(num_channels: int, spatial_dims: int) -> nn.Module:
    """InstanceNorm2d/3d with learnable affine parameters."""
    return _by_dims(spatial_dims, {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d})(num_channels, affine=True)


def _group_norm(num_channels: int, spatial_dims: int) -> nn.Module:
    """GroupNorm with :func:`group_count` groups (dimension-agnostic)."""
    check_choice("spatial_dims", spatial_dims, SPATIAL_DIMS)
    return nn.GroupNorm(group_count(num_channels), num_channels)


NORMS: dict[str, Callable[[int, int], nn.Module]] = {
    "batch": _batch_norm,
    "instance": _instance_norm,
    "group": _group_norm,
}
NORM_CHOICES: list[str | None] = [*sorted(NORMS), None]


def check_norm(norm: str | None) -> None:
    """Validate a ``norm`` name (``None`` means no normalisation)."""
    check_choice("norm", norm, NORM_CHOICES)


def norm_layer(norm: str | None, num_channels: int, spatial_dims: int) -> nn.Module | None:
    """Build the normalisation layer named ``norm``, or return ``None`` for ``norm=None``."""
    check_norm(norm)
    return None if norm is None else NORMS[norm](num_channels, spatial_dims)


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    spatial_dims: int,
    norm: str | None,
    kernel_size: int = 3,
    act: bool = True,
) -> nn.Sequential:
    """Same-padded conv (bias only when no norm follows), optional norm, optional ReLU."""
    layers: list[nn.Module] = [
        conv_cls(spatial_dims)(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=norm is None
        )
    ]
    norm_module = norm_layer(norm, out_channels, spatial_dims)
    if norm_module is not None:
        layers.append(norm_module)
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _transpose_up(in_channels: int, out_channels: int, spatial_dims: int) -> nn.Module:
    """2x up-convolution: ConvTranspose kernel 2, stride 2 (Ronneberger's "up-conv 2x2")."""
    return conv_transpose_cls(spatial_dims)(in_channels, out_channels, kernel_size=2, stride=2)


def _interp_up(in_channels: int, out_channels: int, spatial_dims: int) -> nn.Module:
    """2x (bi/tri)linear resize followed by a 3x3 conv ("resize-convolution")."""
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode=mode, align_corners=False),
        conv_cls(spatial_dims)(in_channels, out_channels, kernel_size=3, padding=1),
    )


UPSAMPLES: dict[str, Callable[[int, int, int], nn.Module]] = {
    "transpose": _transpose_up,
    "interp": _interp_up,
}


def upsample_layer(upsample: str, in_channels: int, out_channels: int, spatial_dims: int) -> nn.Module:
    """Build the 2x upsampling layer named ``upsample`` (see :data:`UPSAMPLES`)."""
    check_choice("upsample", upsample, sorted(UPSAMPLES))
    check_choice("spatial_dims", spatial_dims, SPATIAL_DIMS)
    return UPSAMPLES[upsample](in_channels, out_channels, spatial_dims)

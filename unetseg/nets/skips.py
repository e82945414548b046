"""Long-skip merge modules: how a decoder level combines its upsampled input with the encoder's skip.

Each merge is built with ``channels`` (the channel count of both the upsampled tensor and the skip), owns
its channel arithmetic through ``out_channels``, and is called as ``merge(x_up, skip)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from unetseg.nets.layers import check_choice


class ConcatSkip(nn.Module):
    """Ronneberger's skip: concatenate ``[skip, x_up]`` along channels (``out_channels = 2 * channels``).

    >>> import torch
    >>> ConcatSkip(4)(torch.rand(1, 4, 8, 8), torch.rand(1, 4, 8, 8)).shape
    torch.Size([1, 8, 8, 8])
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_channels = 2 * channels

    def forward(self, x_up: Tensor, skip: Tensor) -> Tensor:
        return torch.cat([skip, x_up], dim=1)


class AddSkip(nn.Module):
    """Additive skip (LinkNet/ResNet style): ``x_up + skip`` (``out_channels = channels``).

    >>> import torch
    >>> AddSkip(4)(torch.rand(1, 4, 8, 8), torch.rand(1, 4, 8, 8)).shape
    torch.Size([1, 4, 8, 8])
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_channels = channels

    def forward(self, x_up: Tensor, skip: Tensor) -> Tensor:
        return x_up + skip


class NoSkip(nn.Module):
    """No long skip: returns ``x_up`` and ignores ``skip`` (``out_channels = channels``).

    The decoder then sees the encoder only through the bottleneck.

    >>> import torch
    >>> NoSkip(4)(torch.rand(1, 4, 8, 8), torch.rand(1, 4, 8, 8)).shape
    torch.Size([1, 4, 8, 8])
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_channels = channels

    def forward(self, x_up: Tensor, skip: Tensor) -> Tensor:
        return x_up


#: Long-skip mode name -> merge class.
LONG_SKIPS: dict[str, type[nn.Module]] = {
    "concat": ConcatSkip,
    "add": AddSkip,
    "none": NoSkip,
}


def resolve_long_skip(long_skip: str | Sequence[str], channels: Sequence[int]) -> tuple[str, ...]:
    """Expand ``long_skip`` to one validated mode per skip, shallowest first (``len(channels) - 1``)."""
    num_skips = len(channels) - 1
    allowed = sorted(LONG_SKIPS)
    if isinstance(long_skip, str):
        check_choice("long_skip", long_skip, allowed)
        return (long_skip,) * num_skips
    if not isinstance(long_skip, (list, tuple)):
        raise ValueError(
            f"long_skip={long_skip!r} must be one of {allowed} or a list/tuple of them "
            f"(one per skip, shallowest first)"
        )
    if len(long_skip) != num_skips:
        raise ValueError(
            f"long_skip has {len(long_skip)} entries but channels={tuple(channels)} needs {num_skips} "
            f"(one per skip, shallowest first)"
        )
    for i, mode in enumerate(long_skip):
        check_choice(f"long_skip[{i}]", mode, allowed)
    return tuple(long_skip)

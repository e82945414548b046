"""Parameter counts and parameter matching: widen or narrow a variant's net to the baseline's parameter count.

Nets are rebuilt from their constructor arguments on the meta device (no memory, milliseconds per count), so a
width search over a large net stays cheap. A net says which constructor argument sets its widths with a
``width_argument`` class attribute (default ``channels``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from unetseg.analysis.grid import AblationError

Builder = Callable[[Sequence[int]], nn.Module]


def parameter_counts(net: nn.Module) -> dict[str, int]:
    """``net.parameter_counts()`` when the net has it, else ``{"total": n}``."""
    counts = getattr(net, "parameter_counts", None)
    return dict(counts()) if callable(counts) else {"total": sum(p.numel() for p in net.parameters())}


@dataclass
class NetSpec:
    """How a checked variant's net is built: class, constructor arguments (linked values filled in), the
    argument that sets its width (``width_argument`` class attribute, default ``channels``) and its widths.

    >>> from unetseg.nets import UNet
    >>> spec = NetSpec(UNet, {"out_channels": 2}, "channels", (4, 8))
    >>> count_parameters(spec.builder(), (4, 8)), count_parameters(spec.builder(), (8, 16))
    (1682, 6498)
    """

    cls: type[nn.Module]
    init_args: dict[str, Any]
    width_argument: str
    widths: tuple[int, ...] | None

    @classmethod
    def from_cli(cls, cli: Any) -> NetSpec:
        """The net of a parsed and instantiated training CLI (``unetseg.training.cli.build_cli``)."""
        net = cli.model.net
        init_args = cli.config["model"]["net"]["init_args"]
        init_args = dict(init_args.as_dict() if hasattr(init_args, "as_dict") else init_args)
        for linked in ("spatial_dims", "in_channels", "out_channels"):
            if linked in init_args and hasattr(net, linked):
                init_args[linked] = getattr(net, linked)
        width_argument = getattr(type(net), "width_argument", "channels")
        widths = getattr(net, width_argument, None) if width_argument in init_args else None
        return cls(type(net), init_args, width_argument, None if widths is None else tuple(map(int, widths)))

    def builder(self) -> Builder:
        """``build(widths) -> net``; raises :class:`AblationError` if the net has no width argument."""
        if self.widths is None:
            raise AblationError(
                f"{self.cls.__name__} has no width argument {self.width_argument!r} to match parameters with"
            )
        return lambda widths: self.cls(**{**self.init_args, self.width_argument: list(widths)})


def count_parameters(build: Builder, widths: Sequence[int]) -> int:
    """Parameters of ``build(widths)``, built on the meta device (no memory, milliseconds).

    >>> count_parameters(lambda w: nn.Conv2d(1, w[0], 3), (4,))  # 4 filters of 3x3 and 4 biases
    40
    """
    with torch.device("meta"):
        return sum(p.numel() for p in build(widths).parameters())


class _WidthSearch:
    """Cached parameter counts of ``build(widths)`` and their relative error to ``target``."""

    def __init__(self, build: Builder, widths: tuple[int, ...], target: int) -> None:
        self.build, self.widths, self.target = build, widths, target
        self.cache: dict[tuple[int, ...], int] = {}

    def scaled(self, multiplier: float) -> tuple[int, ...]:
        """The widths times ``multiplier``, rounded, at least 1."""
        return tuple(max(1, round(w * multiplier)) for w in self.widths)

    def count(self, widths: tuple[int, ...]) -> int:
        """Parameters of ``build(widths)`` (counted once)."""
        if widths not in self.cache:
            self.cache[widths] = count_parameters(self.build, widths)
        return self.cache[widths]

    def error(self, widths: tuple[int, ...]) -> float:
        """``|count - target| / target``."""
        return abs(self.count(widths) - self.target) / self.target

    def bisect(self) -> tuple[int, ...]:
        """The closest widths met while bisecting a common multiplier between bounds around the target."""
        lo, hi = 1.0, 1.0
        while self.count(self.scaled(hi)) < self.target and hi < 64:
            hi *= 2
        while self.count(self.scaled(lo)) > self.target and lo > 1 / 64:
            lo /= 2
        best = min((self.scaled(lo), self.scaled(hi), self.widths), key=self.error)
        for _ in range(40):
            mid = (lo + hi) / 2
            best = min(best, self.scaled(mid), key=self.error)
            lo, hi = (mid, hi) if self.count(self.scaled(mid)) < self.target else (lo, mid)
        return best

    def refine(self, best: tuple[int, ...]) -> tuple[int, ...]:
        """+-1 channel per level while that gets closer to the target."""
        improved = True
        while improved and self.error(best) > 0:
            improved = False
            for i in range(len(best)):
                for step in (-1, 1):
                    candidate = tuple(w + step if j == i else w for j, w in enumerate(best))
                    if candidate[i] >= 1 and self.error(candidate) < self.error(best):
                        best, improved = candidate, True
        return best


def match_width(
    build: Builder, widths: Sequence[int], target: int, tolerance: float = 0.02
) -> tuple[tuple[int, ...], int, float]:
    """Widths whose net has ``target`` parameters within ``tolerance`` (relative).

    Bisection on a common multiplier ``m`` (widths ``round(m * w)``), then +-1 channel per level while that
    gets closer. Returns ``(widths, parameters, multiplier)``; raises :class:`AblationError` if the best is
    outside the tolerance.

    >>> match_width(lambda w: nn.Conv2d(1, w[0], 3), (2,), target=40)  # 10 parameters per channel
    ((4,), 40, 2.0)
    """
    search = _WidthSearch(build, tuple(int(w) for w in widths), target)
    best = search.refine(search.bisect())
    if search.error(best) > tolerance:
        raise AblationError(
            f"could not match {target} parameters within {tolerance:.1%}: best widths {list(best)} have "
            f"{search.count(best)} ({search.error(best):+.1%}); raise param_tolerance or use wider nets"
        )
    return best, search.count(best), sum(best) / sum(search.widths)

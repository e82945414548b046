"""Where training items come from: class-aware oversampling per batch, random windows, per-worker generators.

nnU-Net's foreground oversampling, per class: of every batch of ``batch_size`` training items, the last
``ceil(oversample * batch_size)`` are *forced*: each shows a foreground class drawn uniformly among the
classes present in the training cases, at a random voxel of that class (a random case containing the class,
then a random voxel of it in that case); the window (3D patch, or 2D crop of the voxel's slice) is random
among those that contain the voxel. The other items are uniformly random (slices or patches), so classes
appear there at their natural rate. A rare class (a few slices of a few cases) is then seen in about
``ceil(oversample * batch_size) / num_foreground_classes`` items of every batch.

The guarantee needs each item's position in its batch: training datasets draw their items themselves
(item ``i`` is forced or random by ``i % batch_size``) and the loader does not shuffle them. The voxels of
each class are gathered once (``ClassLocations.gather``, in ``setup``), so drawing costs a few random numbers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import get_worker_info

from unetseg.data.formats.layout import Case

MAX_LOCATIONS = 2_000  # voxels kept per case and class (a uniform subsample of larger classes)


def check_fraction(oversample: float) -> float:
    """``oversample`` as a float in [0, 1]; raises naming the value otherwise."""
    if isinstance(oversample, bool) or not isinstance(oversample, int | float) or not 0 <= oversample <= 1:
        raise ValueError(
            f"oversample={oversample!r}: expected a float in [0, 1], the share of every training batch that "
            "shows a foreground class (0.33 as nnU-Net; 0 = uniformly random items)"
        )
    return float(oversample)


class WorkerRandom:
    """Numpy generator per process, seeded from torch and ``seed`` (reproducible via ``seed_everything``).

    In a DataLoader worker torch's seed differs per worker and epoch, so workers get distinct streams.
    """

    seed: int = 0
    _gen: np.random.Generator | None = None
    _gen_key: tuple[int, int] | None = None

    def rng(self) -> np.random.Generator:
        """This process's (worker's) generator."""
        info = get_worker_info()
        key = (os.getpid(), -1 if info is None else info.id)
        if self._gen is None or self._gen_key != key:
            self._gen = np.random.default_rng([torch.initial_seed(), self.seed])
            self._gen_key = key
        return self._gen


def randint(rng: np.random.Generator, n: int) -> int:
    """A uniform int in ``[0, n)`` (``rng.random()`` based: 3x cheaper than ``rng.integers`` per call)."""
    return int(rng.random() * n)


def class_voxels(
    label: np.ndarray, rng: np.random.Generator, limit: int = MAX_LOCATIONS
) -> dict[int, np.ndarray]:
    """``{class: coords (n, label.ndim)}`` of each foreground class in ``label`` (at most ``limit`` each).

    >>> class_voxels(np.array([[0, 2], [1, 2]]), np.random.default_rng(0))[2].tolist()
    [[0, 1], [1, 1]]
    """
    flat = np.flatnonzero(label)
    values = np.asarray(label).reshape(-1)[flat]
    dtype = np.int16 if max(label.shape) < 2**15 else np.int32
    out = {}
    for cls in np.unique(values).tolist():
        if cls < 0:
            continue
        index = flat[values == cls]
        if len(index) > limit:
            index = np.sort(rng.choice(index, limit, replace=False))
        out[int(cls)] = np.stack(np.unravel_index(index, label.shape), axis=1).astype(dtype)
    return out


@dataclass(frozen=True)
class ClassLocations:
    """The voxels of each foreground class in a list of cases, gathered once for class-aware sampling.

    >>> locations = ClassLocations.gather(cases, loader.load_label)  # doctest: +SKIP
    >>> locations.classes, locations.cases_with[3]  # present classes; cases holding 3  # doctest: +SKIP
    ([1, 2, 3], array([0, 5]))
    >>> case_index, voxel = locations.draw(np.random.default_rng(0))  # voxel (spatial,)  # doctest: +SKIP
    """

    classes: list[int] = field(default_factory=list)
    cases_with: dict[int, np.ndarray] = field(default_factory=dict)
    voxels: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    @classmethod
    def gather(
        cls, cases: Sequence[Case], labels: Callable[[Case], np.ndarray | None], seed: int = 0
    ) -> ClassLocations:
        """Read each case's label once (``labels(case)``), keep up to ``MAX_LOCATIONS`` voxels per class."""
        rng = np.random.default_rng(seed)
        voxels: dict[tuple[int, int], np.ndarray] = {}
        for index, case in enumerate(cases):
            label = labels(case)
            if label is None:
                raise ValueError(f"class-aware sampling needs labels; case {case.case_id} has none")
            for c, coords in class_voxels(label, rng).items():
                voxels[(index, c)] = coords
        classes = sorted({c for _, c in voxels})
        cases_with = {c: np.array(sorted(i for i, k in voxels if k == c)) for c in classes}
        return cls(classes, cases_with, voxels)

    def draw(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """``(case index, voxel)``: a uniform class, a random case holding it, a random voxel of it there."""
        c = self.classes[randint(rng, len(self.classes))]
        holders = self.cases_with[c]
        case = int(holders[randint(rng, len(holders))])
        coords = self.voxels[(case, c)]
        return case, coords[randint(rng, len(coords))]


@dataclass
class BatchPlan:
    """Which items are forced onto a foreground class: the last ``ceil(fraction * n)`` of each batch.

    ``n`` is ``batch_size``, or the size of the epoch's last, shorter batch. ``stride`` is the number of
    processes that split the items (DDP: rank ``r`` gets items ``r, r + stride, ...``), so positions are
    counted in each process's own batches.

    >>> plan = BatchPlan(fraction=0.5, batch_size=4, length=10)
    >>> [plan.forced(i) for i in range(10)]
    [False, False, True, True, False, False, True, True, False, True]
    """

    fraction: float = 0.0
    batch_size: int = 1
    length: int = 0
    stride: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.stride < 1:
            raise ValueError(f"batch_size={self.batch_size!r}, stride={self.stride!r}: expected ints >= 1")
        local = math.ceil(self.length / self.stride)  # items per process
        self._full_batches = local // self.batch_size
        last = local % self.batch_size
        self._first_forced = [self._random_items(self.batch_size), self._random_items(last)]

    def _random_items(self, size: int) -> int:
        """Number of random (not forced) items at the start of a batch of ``size``."""
        return size - math.ceil(self.fraction * size - 1e-9)

    def forced(self, index: int) -> bool:
        """Whether item ``index`` must show a foreground class."""
        batch, position = divmod(index // self.stride, self.batch_size)
        return self.fraction > 0 and position >= self._first_forced[batch >= self._full_batches]


def window_starts(
    shape: Sequence[int],
    size: Sequence[int],
    mode: str,
    rng: np.random.Generator,
    voxel: Sequence[int] | None = None,
) -> list[int]:
    """Window starts for ``mode`` ``random`` (uniform; among the windows containing ``voxel`` if given) or
    ``center``; negative starts pad images smaller than the window.

    >>> window_starts((10,), (4,), "random", np.random.default_rng(0), voxel=(9,))
    [6]
    """
    starts = []
    for axis, (dim, n) in enumerate(zip(shape, size, strict=True)):
        lo, hi = min(0, dim - n), max(0, dim - n)
        if mode == "center":
            starts.append((dim - n) // 2)
            continue
        if voxel is not None:
            lo, hi = max(lo, int(voxel[axis]) - n + 1), min(hi, int(voxel[axis]))
        starts.append(lo + randint(rng, hi - lo + 1))
    return starts


class ClassSampler:
    """Decides each training item: forced onto a class voxel (``ClassLocations.draw``) or random.

    >>> sampler = ClassSampler(cases, loader.load_label, 0.5, batch_size=8, length=64)  # doctest: +SKIP
    >>> sampler.pick(7, rng)  # last item of a batch: (case index, class voxel)  # doctest: +SKIP
    (3, array([12, 40, 7], dtype=int16))
    """

    def __init__(
        self,
        cases: Sequence[Case],
        labels: Callable[[Case], np.ndarray | None],
        oversample: float,
        batch_size: int,
        length: int,
        seed: int = 0,
    ) -> None:
        fraction = check_fraction(oversample)
        self.locations = ClassLocations.gather(cases, labels, seed) if fraction > 0 else ClassLocations()
        self.plan = BatchPlan(fraction, batch_size, length)

    def set_stride(self, stride: int) -> None:
        """Count batch positions per process when ``stride`` processes split the items (DDP world size)."""
        self.plan = BatchPlan(self.plan.fraction, self.plan.batch_size, self.plan.length, stride)

    def pick(self, index: int, rng: np.random.Generator) -> tuple[int, np.ndarray] | None:
        """``(case index, voxel)`` when item ``index`` is forced (and any class is present), else ``None``."""
        if not self.locations.classes or not self.plan.forced(index):
            return None
        return self.locations.draw(rng)

"""The dataset fingerprint: what the planner needs to know about a dataset, read once from its files.

Like nnU-Net's fingerprint extraction: per case the shape, the voxel spacing and the share of voxels that are
exactly zero in every channel (a zero background, e.g. a skull-stripped MRI), per input channel intensity
statistics over the foreground (label > 0) voxels, per class how many voxels it has and in how many cases and
slices it appears. Only the training cases (of the split, when one is given) are read.

>>> fp = dataset_fingerprint(detect_layout("/data/Task04_Hippocampus"))  # doctest: +SKIP
>>> fp.median_shape, fp.class_slice_fraction(axis=2)  # doctest: +SKIP
((36, 50, 35), [1.0, 0.62, 0.59])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from unetseg.data.formats import Case, DatasetSpec, read_image, read_label

INTENSITY_SAMPLES = 10_000  # foreground voxels sampled per case and channel for the intensity percentiles


@dataclass
class Fingerprint:
    """Shapes, spacings, intensities and class statistics of a dataset's training cases.

    ``class_voxels[k]``: voxels of class ``k`` over all cases; ``class_cases[k]``: cases containing it;
    ``class_slices[axis][k]``: slices along ``axis`` containing it, of ``num_slices[axis]`` slices in all.
    ``zero_fractions[i]``: share of case ``i``'s voxels that are 0 in every channel.

    >>> fp = Fingerprint(["background", "a"], ["MRI"], 3, [(8, 8, 4)], [(1.0, 1.0, 2.0)])
    >>> fp.median_shape, fp.median_spacing
    ((8, 8, 4), (1.0, 1.0, 2.0))
    """

    class_names: list[str]
    channel_names: list[str]
    spatial_dims: int
    shapes: list[tuple[int, ...]]
    spacings: list[tuple[float, ...]]
    intensity: list[dict[str, float]] = field(default_factory=list)
    class_voxels: list[int] = field(default_factory=list)
    class_cases: list[int] = field(default_factory=list)
    class_slices: list[list[int]] = field(default_factory=list)
    num_slices: list[int] = field(default_factory=list)
    constant_cases: list[str] = field(default_factory=list)
    bytes_per_case: float = 0.0
    zero_fractions: list[float] = field(default_factory=list)

    @property
    def num_cases(self) -> int:
        """Number of cases read."""
        return len(self.shapes)

    @property
    def median_shape(self) -> tuple[int, ...]:
        """Median shape per axis."""
        return tuple(int(v) for v in np.median(np.array(self.shapes), axis=0))

    @property
    def median_spacing(self) -> tuple[float, ...]:
        """Median voxel spacing per axis."""
        return tuple(float(v) for v in np.median(np.array(self.spacings), axis=0))

    @property
    def median_zero_fraction(self) -> float:
        """Median over the cases of the share of voxels that are 0 in every channel (0 when unknown)."""
        return float(np.median(self.zero_fractions)) if self.zero_fractions else 0.0

    def foreground_fraction(self) -> list[float]:
        """Share of each class among the foreground voxels (background: 0)."""
        foreground = max(1, sum(self.class_voxels[1:]))
        return [0.0, *(v / foreground for v in self.class_voxels[1:])]

    def class_slice_fraction(self, axis: int) -> list[float]:
        """Share of the slices along ``axis`` that contain each class."""
        total = max(1, self.num_slices[axis])
        return [n / total for n in self.class_slices[axis]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable copy."""
        return asdict(self)


def _intensity_stats(samples: list[np.ndarray]) -> dict[str, float]:
    """Mean, std and 0.5/50/99.5 percentiles of the pooled foreground samples of one channel."""
    values = np.concatenate(samples) if samples else np.zeros(1, np.float32)
    p_low, median, p_high = np.percentile(values, [0.5, 50.0, 99.5])
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "p00_5": float(p_low),
        "median": float(median),
        "p99_5": float(p_high),
    }


def _count_slices(label: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Per spatial axis, how many slices along it contain each class."""
    counts = []
    for axis in range(label.ndim):
        other = tuple(a for a in range(label.ndim) if a != axis)
        present = np.stack([(label == k).any(axis=other) for k in range(num_classes)])
        counts.append(present.sum(axis=1))
    return counts


def dataset_fingerprint(spec: DatasetSpec, cases: Sequence[Case] | None = None, seed: int = 0) -> Fingerprint:
    """Read every case of ``cases`` (default: the training cases) once and collect its fingerprint."""
    cases = list(spec.cases_train if cases is None else cases)
    if not cases:
        raise ValueError(f"{spec.root}: no training cases to plan from")
    rng = np.random.default_rng(seed)
    k = spec.num_classes
    fp = Fingerprint(list(spec.class_names), list(spec.channel_names), spec.spatial_dims, [], [])
    fp.class_voxels, fp.class_cases = [0] * k, [0] * k
    slices = [np.zeros(k, np.int64) for _ in range(spec.spatial_dims)]
    samples: list[list[np.ndarray]] = [[] for _ in range(spec.in_channels)]
    total_bytes = 0
    for case in cases:
        image, header = read_image(case, spec)
        label = read_label(case, spec)
        if label is None:
            raise ValueError(f"case {case.case_id} ({case.images[0]}) has no label: cannot plan from it")
        fp.shapes.append(tuple(int(s) for s in label.shape))
        fp.spacings.append(tuple(float(s) for s in header.spacing[: label.ndim]))
        counts = np.bincount(label.ravel(), minlength=k)[:k]
        fp.class_voxels = [a + int(b) for a, b in zip(fp.class_voxels, counts, strict=True)]
        fp.class_cases = [a + int(b > 0) for a, b in zip(fp.class_cases, counts, strict=True)]
        for axis, found in enumerate(_count_slices(label, k)):
            slices[axis] += found
        if any(float(channel.max()) == float(channel.min()) for channel in image):
            fp.constant_cases.append(case.case_id)
        fp.zero_fractions.append(float((image == 0).all(axis=0).mean()))
        foreground = label > 0
        for c, channel in enumerate(image):
            values = channel[foreground] if foreground.any() else channel.ravel()
            take = min(INTENSITY_SAMPLES, values.size)
            samples[c].append(rng.choice(values, size=take, replace=False))
        total_bytes += image.nbytes + label.size  # float32 image + uint8 label in memory
    fp.class_slices = [s.tolist() for s in slices]
    fp.num_slices = [int(sum(shape[axis] for shape in fp.shapes)) for axis in range(spec.spatial_dims)]
    fp.intensity = [_intensity_stats(s) for s in samples]
    fp.bytes_per_case = total_bytes / len(cases)
    return fp

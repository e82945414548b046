"""Built-in synthetic segmentation data: MR-like 2D/3D images of an organ with lesions and a vessel.

Nothing is downloaded: each sample is generated on the fly from ``numpy.random.default_rng([seed, split,
i])``, so sample ``i`` is the same whatever the worker, the access order or the batch it lands in, and the
train, val and test splits draw from disjoint random streams.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

CLASS_NAMES: tuple[str, ...] = ("background", "organ", "lesion", "vessel")
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}


def _gaussian_basis(n: int, n_ctrl: int) -> np.ndarray:
    """Smooth interpolation matrix (n, n_ctrl): Gaussian bumps on evenly spaced control points."""
    x = (np.arange(n) + 0.5) / n
    ctrl = np.arange(-1, n_ctrl + 2) / n_ctrl  # one spare control point beyond each border
    return np.exp(-0.5 * ((x[:, None] - ctrl[None, :]) * n_ctrl) ** 2).astype(np.float32)


def smooth_field(rng: np.random.Generator, shape: Sequence[int], n_ctrl: int) -> np.ndarray:
    """Random smooth field of ``shape``, zero mean and unit std; ``n_ctrl`` sets the number of bumps per axis.

    Gaussian-weighted random control points, contracted one axis at a time (cost ~ N * n_ctrl, no pixel loop).

    >>> smooth_field(np.random.default_rng(0), (96, 96), n_ctrl=4).shape
    (96, 96)
    """
    bases = [_gaussian_basis(n, n_ctrl) for n in shape]
    field = rng.standard_normal([b.shape[1] for b in bases], dtype=np.float32)
    for basis in bases:  # contracts the leading axis and appends the new one: axis order is kept
        field = np.tensordot(field, basis, axes=([0], [1]))
    field -= field.mean()
    return field / (field.std() + 1e-8)


def _random_rotation(rng: np.random.Generator, spatial_dims: int) -> np.ndarray:
    """Uniformly random rotation matrix (spatial_dims, spatial_dims) via QR of a Gaussian matrix."""
    q, r = np.linalg.qr(rng.standard_normal((spatial_dims, spatial_dims)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def _vessel_distance(
    rng: np.random.Generator, coords: np.ndarray, center: np.ndarray, size: float
) -> np.ndarray:
    """Approximate distance (in pixels) to a smooth random curve through ``center`` that crosses the image.

    The curve is the zero set of the ``spatial_dims - 1`` wavy planes ``g_j = n_j.r - a_j sin(w_j u.r + p_j)``
    (``r = x - center``, orthonormal ``u, n_j``); the distance to each plane is ``|g_j| / |grad g_j|``, their
    root-sum-square the distance to the curve (a line in 2D, a tube in 3D).
    """
    spatial_dims = coords.shape[0]
    frame = _random_rotation(rng, spatial_dims)
    rel = coords - center
    along = np.tensordot(frame[:, 0], rel, axes=1)
    dist_sq = 0.0
    for j in range(1, spatial_dims):
        amp = rng.uniform(0.04, 0.10) * size
        freq = 2 * np.pi * rng.uniform(0.8, 1.6) / size
        phase = rng.uniform(0, 2 * np.pi)
        wave = freq * along + phase
        g = np.tensordot(frame[:, j], rel, axes=1) - amp * np.sin(wave)
        dist_sq = dist_sq + g**2 / (1.0 + (amp * freq * np.cos(wave)) ** 2)
    return np.sqrt(dist_sq)


def generate_sample(rng: np.random.Generator, spatial_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image/label pair; returns ``(image float32 (*spatial_size), label int64 (*spatial_size))``.

    Labels follow ``CLASS_NAMES``: 0 background, 1 organ (a large deformed ellipse/ellipsoid with textured
    interior), 2 lesion (1-3 small blobs inside the organ, slightly brighter or darker than it), 3 vessel (a
    thin bright curve/tube crossing the image, 1-3 px wide). The image has a smooth background texture, a
    multiplicative bias field and Gaussian noise, and is standardized to zero mean and unit std.

    >>> image, label = generate_sample(np.random.default_rng(0), (96, 96))
    >>> image.shape, image.dtype, label.dtype
    ((96, 96), dtype('float32'), dtype('int64'))
    """
    shape = tuple(int(s) for s in spatial_size)
    spatial_dims = len(shape)

    def column(vector: Sequence[float] | np.ndarray) -> np.ndarray:
        """Per-axis vector as float32 (spatial_dims, 1, ..., 1), broadcastable against coordinate grids."""
        return np.asarray(vector, dtype=np.float32).reshape(-1, *([1] * spatial_dims))

    pixels = np.indices(shape, dtype=np.float32) + 0.5  # float32 throughout: its SIMD sin/exp are ~10x faster
    unit = pixels / column(shape)  # coordinates in [0, 1]

    # organ: rotated ellipse/ellipsoid whose boundary is perturbed by a low-frequency field
    center = 0.5 + rng.uniform(-0.06, 0.06, spatial_dims)
    radii = rng.uniform(0.24, 0.34, spatial_dims)
    rel = np.tensordot(_random_rotation(rng, spatial_dims).T, unit - column(center), axes=1)
    rho = np.sqrt(np.sum((rel / column(radii)) ** 2, axis=0))
    organ = rho < 1.0 + 0.12 * smooth_field(rng, shape, n_ctrl=3)

    # lesions: small deformed blobs centred on random deep organ pixels, clipped to the organ
    inner = np.flatnonzero(organ & (rho < 0.65))
    lesion_shape = 1.0 + 0.2 * smooth_field(rng, shape, n_ctrl=8)
    lesion = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(1, 4)):
        pixel = rng.choice(inner) if inner.size else np.ravel_multi_index([s // 2 for s in shape], shape)
        lesion_center = unit.reshape(spatial_dims, -1)[:, pixel]
        dist = np.sqrt(np.sum((unit - column(lesion_center)) ** 2, axis=0))
        lesion |= dist < rng.uniform(0.05, 0.09) * lesion_shape
    lesion &= organ

    # vessel: thin curve through the organ region; label its core, blur its intensity profile (partial volume)
    vessel_center = (center + rng.uniform(-0.1, 0.1, spatial_dims)) * np.asarray(shape)
    dist = _vessel_distance(rng, pixels, column(vessel_center), float(np.mean(shape)))
    half_width = rng.uniform(0.7, 1.3)
    label = np.where(dist <= half_width, 3, organ.astype(np.uint8) + lesion)  # lesion is inside the organ: 2
    label = label.astype(np.int64)
    profile = np.exp(-0.5 * (dist / half_width) ** 2)

    # intensities: tissue means + textures, vessel overlay, bias field, noise, standardization
    background = rng.uniform(0.2, 0.4) + 0.08 * smooth_field(rng, shape, n_ctrl=5)
    image = np.where(organ, rng.uniform(0.9, 1.1) + 0.05 * smooth_field(rng, shape, n_ctrl=12), background)
    image = np.where(lesion, image + float(rng.choice([-1.0, 1.0])) * rng.uniform(0.25, 0.4), image)
    image = image * (1.0 - profile) + rng.uniform(1.7, 2.0) * profile
    image *= np.exp(0.15 * smooth_field(rng, shape, n_ctrl=2))
    image += rng.uniform(0.08, 0.12) * rng.standard_normal(shape, dtype=np.float32)
    image -= image.mean()
    image /= image.std() + 1e-6
    return image, label


def spatial_shape(
    spatial_size: int | Sequence[int], spatial_dims: int, name: str = "spatial_size"
) -> tuple[int, ...]:
    """Checked ``spatial_dims``-tuple of positive ints from an int (every axis) or a per-axis sequence.

    >>> spatial_shape(64, 3), spatial_shape([32, 48], 2)
    ((64, 64, 64), (32, 48))
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims={spatial_dims!r}: expected 2 or 3")
    size = (spatial_size,) * spatial_dims if isinstance(spatial_size, int) else tuple(spatial_size)
    if len(size) != spatial_dims or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size
    ):
        raise ValueError(f"{name}={spatial_size!r}: expected a positive int or {spatial_dims} positive ints")
    return size


class SyntheticSegmentation(Dataset):
    """Deterministic generated MR-like segmentation data with classes ``CLASS_NAMES`` (no download).

    Item ``i`` is generated from ``numpy.random.default_rng([seed, SPLITS[split], i])``: identical across
    workers and access order, and disjoint between splits.

    Example:
        >>> ds = SyntheticSegmentation(8, spatial_size=96, spatial_dims=2, seed=0, split="train")
        >>> item = ds[0]
        >>> item["image"].shape, item["label"].shape  # float32 (1, H, W), int64 (H, W)
        (torch.Size([1, 96, 96]), torch.Size([96, 96]))
    """

    def __init__(
        self,
        num_samples: int,
        spatial_size: int | Sequence[int] = 96,
        spatial_dims: int = 2,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        size = spatial_shape(spatial_size, spatial_dims)
        if num_samples < 0:
            raise ValueError(f"num_samples={num_samples!r}: expected >= 0")
        if seed < 0:
            raise ValueError(f"seed={seed!r}: expected >= 0")
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {sorted(SPLITS)}")
        self.num_samples = num_samples
        self.spatial_size = size
        self.spatial_dims = spatial_dims
        self.seed = seed
        self.split = split

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        image, label = generate_sample(rng, self.spatial_size)
        return {"image": torch.from_numpy(image)[None], "label": torch.from_numpy(label)}

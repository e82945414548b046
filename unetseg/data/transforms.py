"""Training augmentation: albumentations pipelines for 2D (written as YAML lists), small numpy ones for 3D.

2D, ``build_augmentation`` turns a YAML list into an ``albumentations.Compose``::

    augmentation:
      - HorizontalFlip: {p: 0.5}
      - Affine: {rotate: [-15, 15], scale: [0.9, 1.1], p: 0.5}
      - ElasticTransform: {alpha: 30, sigma: 6, p: 0.2}
      - RandomBrightnessContrast: {brightness_limit: 0.1, contrast_limit: 0.1, p: 0.5}
      - OneOf: {transforms: [{GaussNoise: {}}, {GaussianBlur: {}}], p: 0.3}

Masks are always warped with nearest-neighbour interpolation (a non-nearest ``mask_interpolation`` is
rejected), so they stay integer labels from the label set. Images may have any number of channels.

3D, ``build_augmentation_3d`` uses the own transforms of ``TRANSFORMS_3D`` (random flips per axis, rotations
by 90 degrees in a random plane, intensity scale/shift jitter); they work on ``(C, *spatial)`` arrays of any
spatial rank, keep the label integer and the patch shape (90-degree turns only in planes with equal sides).

Datasets call a transform as ``transform(image (C, *spatial) float32, label (*spatial) int | None, rng)`` and
get ``(image, label)`` back; ``as_transform`` wraps an ``albumentations.Compose`` into that interface.
Validation and test datasets get ``transform=None``: they are never augmented.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

AugSpec = Sequence[dict[str, Any] | str] | None
Transform = Callable[
    [np.ndarray, np.ndarray | None, np.random.Generator], tuple[np.ndarray, np.ndarray | None]
]

DEFAULT_AUGMENTATION_2D: list[dict[str, Any]] = [
    {"HorizontalFlip": {"p": 0.5}},
    {"Affine": {"rotate": [-15, 15], "scale": [0.9, 1.1], "p": 0.5}},
    {"RandomBrightnessContrast": {"brightness_limit": 0.1, "contrast_limit": 0.1, "p": 0.5}},
]
DEFAULT_AUGMENTATION_3D: list[dict[str, Any]] = [
    {"RandomFlip": {"p": 0.5}},
    {"RandomRot90": {"p": 0.5}},
    {"RandomIntensity": {"scale": [0.9, 1.1], "shift": [-0.1, 0.1], "p": 0.5}},
]
_NEAREST = 0  # cv2.INTER_NEAREST


def _entry(item: dict[str, Any] | str, where: str) -> tuple[str, dict[str, Any]]:
    """``{"Name": {kwargs}}`` / ``{"Name": None}`` / ``"Name"`` -> ``(name, kwargs)``."""
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict) and len(item) == 1:
        name, kwargs = next(iter(item.items()))
        if kwargs is None:
            return str(name), {}
        if isinstance(kwargs, dict):
            return str(name), dict(kwargs)
    raise ValueError(f"{where}: each augmentation must be {{Name: {{arg: value}}}} or a name, got {item!r}")


def _check_kwargs(cls: type, name: str, kwargs: dict[str, Any]) -> None:
    """Raise naming arguments that ``cls.__init__`` does not take (albumentations only warns)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params) - {"self"})
    if unknown:
        allowed = sorted(set(params) - {"self"})
        raise ValueError(f"augmentation {name}: unknown argument(s) {unknown}; {name} takes {allowed}")


def _build_albumentations(items: Sequence[dict[str, Any] | str], where: str) -> list[Any]:
    """Albumentations transform objects for a list of YAML entries (recursing into OneOf, SomeOf, ...)."""
    import albumentations as A

    transforms = []
    for i, item in enumerate(items):
        name, kwargs = _entry(item, f"{where}[{i}]")
        cls = getattr(A, name, None)
        if not (inspect.isclass(cls) and issubclass(cls, A.BasicTransform | A.BaseCompose)):
            raise ValueError(
                f"unknown augmentation '{name}' ({where}[{i}]): not an albumentations transform; see "
                "https://albumentations.ai/docs/ for names (e.g. HorizontalFlip, Affine, ElasticTransform)"
            )
        _check_kwargs(cls, name, kwargs)
        if kwargs.get("mask_interpolation", _NEAREST) != _NEAREST:
            raise ValueError(
                f"augmentation {name}: mask_interpolation must be 0 (nearest) so that masks stay "
                f"integer labels, got {kwargs['mask_interpolation']}"
            )
        if issubclass(cls, A.BaseCompose):
            kwargs["transforms"] = _build_albumentations(kwargs.get("transforms", []), f"{where}[{i}].{name}")
        try:
            transforms.append(cls(**kwargs))
        except (TypeError, ValueError) as err:
            raise ValueError(f"augmentation {name}: invalid arguments {kwargs}: {err}") from err
    return transforms


def build_augmentation(spec: AugSpec) -> Any:
    """``albumentations.Compose`` (masks nearest-neighbour) from a YAML-style list, or ``None`` if empty.

    >>> aug = build_augmentation([{"HorizontalFlip": {"p": 0.5}}, {"Affine": {"rotate": [-15, 15]}}])
    >>> type(aug).__name__
    'Compose'
    """
    if not spec:
        return None
    if isinstance(spec, dict | str):
        raise ValueError(f"augmentation must be a list of {{Name: {{arg: value}}}} entries, got {spec!r}")
    import albumentations as A

    return A.Compose(_build_albumentations(spec, "augmentation"), mask_interpolation=_NEAREST)


class AlbumentationsTransform:
    """Adapts an ``albumentations.Compose`` to ``(image (C, H, W), label (H, W), rng) -> (image, label)``.

    The image goes channels-last for albumentations and back; the label is passed as a ``uint8``/``uint16``
    mask and returned as int64. The compose is re-seeded from ``rng`` on each call, so results follow the
    dataset's seeding (workers included).
    """

    def __init__(self, compose: Any) -> None:
        self.compose = compose

    def __call__(
        self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if image.ndim != 3:
            raise ValueError(f"2D augmentation expects an image (C, H, W), got shape {image.shape}")
        self.compose.set_random_seed(int(rng.integers(2**31)))
        hwc = np.ascontiguousarray(np.moveaxis(image, 0, -1), dtype=np.float32)
        if label is None:
            out = self.compose(image=hwc)
            return np.ascontiguousarray(np.moveaxis(out["image"], -1, 0)), None
        mask_dtype = np.uint8 if label.max(initial=0) < 256 else np.uint16
        out = self.compose(image=hwc, mask=label.astype(mask_dtype))
        image_out = out["image"] if out["image"].ndim == 3 else out["image"][..., None]
        return np.ascontiguousarray(np.moveaxis(image_out, -1, 0)), np.asarray(out["mask"]).astype(np.int64)

    def __repr__(self) -> str:
        return f"AlbumentationsTransform({self.compose!r})"


class RandomFlip:
    """Flip each spatial axis of ``axes`` (default all) independently with probability ``p``."""

    def __init__(self, axes: Sequence[int] | None = None, p: float = 0.5) -> None:
        self.axes = None if axes is None else tuple(int(a) for a in axes)
        self.p = p

    def __call__(
        self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        axes = range(image.ndim - 1) if self.axes is None else self.axes
        for axis in axes:
            if rng.random() < self.p:
                image = np.flip(image, axis + 1)
                label = None if label is None else np.flip(label, axis)
        return image, label

    def __repr__(self) -> str:
        return f"RandomFlip(axes={self.axes}, p={self.p})"


class RandomRot90:
    """With probability ``p``, rotate by k*90 degrees in a random plane of spatial axes.

    k is 1, 2 or 3 in planes with equal sides; only k = 2 in the others, so the shape never changes.
    """

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(
        self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if rng.random() >= self.p or image.ndim < 3:
            return image, label
        planes = list(itertools.combinations(range(image.ndim - 1), 2))
        a, b = planes[int(rng.integers(len(planes)))]
        square = image.shape[a + 1] == image.shape[b + 1]
        k = int(rng.integers(1, 4)) if square else 2
        image = np.rot90(image, k, axes=(a + 1, b + 1))
        label = None if label is None else np.rot90(label, k, axes=(a, b))
        return image, label

    def __repr__(self) -> str:
        return f"RandomRot90(p={self.p})"


class RandomIntensity:
    """With probability ``p``, ``x * s + b`` per channel, ``s ~ U(scale)``, ``b ~ U(shift)``; label kept."""

    def __init__(
        self, scale: Sequence[float] = (0.9, 1.1), shift: Sequence[float] = (-0.1, 0.1), p: float = 0.5
    ):
        if len(scale) != 2 or len(shift) != 2:
            raise ValueError(f"RandomIntensity: scale and shift must be [low, high], got {scale}, {shift}")
        self.scale, self.shift, self.p = tuple(scale), tuple(shift), p

    def __call__(
        self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if rng.random() >= self.p:
            return image, label
        shape = (image.shape[0],) + (1,) * (image.ndim - 1)
        s = rng.uniform(*self.scale, size=shape).astype(np.float32)
        b = rng.uniform(*self.shift, size=shape).astype(np.float32)
        return (image * s + b).astype(np.float32), label

    def __repr__(self) -> str:
        return f"RandomIntensity(scale={self.scale}, shift={self.shift}, p={self.p})"


TRANSFORMS_3D: dict[str, type] = {
    "RandomFlip": RandomFlip,
    "RandomRot90": RandomRot90,
    "RandomIntensity": RandomIntensity,
}


class Compose3D:
    """Applies transforms in order: ``(image (C, *spatial), label (*spatial), rng) -> (image, label)``.

    >>> aug = build_augmentation_3d([{"RandomFlip": {"p": 1.0}}])
    >>> aug(np.arange(8.0).reshape(1, 2, 2, 2), None, np.random.default_rng(0))[0][0, 0, 0].tolist()
    [7.0, 6.0]
    """

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(
        self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        for transform in self.transforms:
            image, label = transform(image, label, rng)
        return image, label

    def __repr__(self) -> str:
        return f"Compose3D({self.transforms})"


def build_augmentation_3d(spec: AugSpec) -> Compose3D | None:
    """``Compose3D`` of ``TRANSFORMS_3D`` entries from a YAML-style list, or ``None`` if empty."""
    if not spec:
        return None
    if isinstance(spec, dict | str):
        raise ValueError(f"augmentation must be a list of {{Name: {{arg: value}}}} entries, got {spec!r}")
    transforms = []
    for i, item in enumerate(spec):
        name, kwargs = _entry(item, f"augmentation[{i}]")
        if name not in TRANSFORMS_3D:
            raise ValueError(
                f"unknown 3D augmentation '{name}' (augmentation[{i}]); expected one of {list(TRANSFORMS_3D)}"
            )
        _check_kwargs(TRANSFORMS_3D[name], name, kwargs)
        transforms.append(TRANSFORMS_3D[name](**kwargs))
    return Compose3D(transforms)


def as_transform(obj: Any) -> Transform | None:
    """``None`` stays ``None``; albumentations composes/transforms are wrapped; other callables pass."""
    if obj is None:
        return None
    import albumentations as A

    if isinstance(obj, A.BaseCompose | A.BasicTransform):
        return AlbumentationsTransform(obj if isinstance(obj, A.BaseCompose) else A.Compose([obj]))
    if not callable(obj):
        raise ValueError(
            f"transform must be callable(image, label, rng) or an albumentations Compose, got {obj!r}"
        )
    return obj


def build_transform(spec: AugSpec, spatial_dims: int) -> Transform | None:
    """The dataset-ready training transform: albumentations for ``spatial_dims=2``, ``Compose3D`` for 3."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return as_transform(build_augmentation(spec)) if spatial_dims == 2 else build_augmentation_3d(spec)

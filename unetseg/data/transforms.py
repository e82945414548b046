"""Training augmentation written as YAML lists: albumentations pipelines in 2D, MONAI transforms in 3D.

2D, ``build_augmentation`` turns a YAML list into an ``albumentations.Compose``::

    augmentation:
      - HorizontalFlip: {p: 0.5}
      - Affine: {rotate: [-15, 15], scale: [0.9, 1.1], p: 0.5}
      - ElasticTransform: {alpha: 30, sigma: 6, p: 0.2}
      - RandomBrightnessContrast: {brightness_limit: 0.1, contrast_limit: 0.1, p: 0.5}
      - OneOf: {transforms: [{GaussNoise: {}}, {GaussianBlur: {}}], p: 0.3}

Masks are always warped with nearest-neighbour interpolation (a non-nearest ``mask_interpolation`` is
rejected), so they stay integer labels from the label set. Images may have any number of channels.

3D, ``build_augmentation_3d`` turns a YAML list of the MONAI dictionary transforms in ``TRANSFORMS_3D`` into a
``Compose3D``::

    augmentation:
      - RandAffined: {prob: 0.2, rotate_range: [0.52, 0.52, 0.52], scale_range: [0.3, 0.3, 0.3]}
      - RandGaussianNoised: {prob: 0.1, std: 0.1}
      - RandAdjustContrastd: {prob: 0.3, gamma: [0.7, 1.5], retain_stats: true}
      - RandFlipd: {prob: 0.5, spatial_axis: 0}

``keys`` are filled in (spatial transforms: image and label; intensity ones: image only) and spatial
transforms get ``mode`` per key (the image's interpolation, default bilinear; the label's always nearest), so
labels stay integers from the label set. ``TRANSFORMS_3D`` lists the names; ``DEFAULT_AUGMENTATION_3D`` is an
nnU-Net-like list.

Datasets call a transform as ``transform(image (C, *spatial) float32, label (*spatial) int | None, rng)`` and
get ``(image, label)`` back; ``as_transform`` wraps an ``albumentations.Compose`` into that interface.
Validation and test datasets get ``transform=None``: they are never augmented.
"""

from __future__ import annotations

import inspect
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
# nnU-Net-like (its default training transforms, written with MONAI's): rotation +-30 degrees (0.52 rad) and
# scaling 0.7-1.3 on a fifth of the patches, noise, blur, brightness, contrast, low resolution, gamma (also on
# the inverted image), mirroring along each axis.
DEFAULT_AUGMENTATION_3D: list[dict[str, Any]] = [
    {"RandAffined": {"prob": 0.2, "rotate_range": [0.52, 0.52, 0.52], "scale_range": [0.3, 0.3, 0.3],
                     "padding_mode": "zeros"}},
    {"RandGaussianNoised": {"prob": 0.1, "std": 0.1}},
    {"RandGaussianSmoothd": {"prob": 0.2, "sigma_x": [0.5, 1.0], "sigma_y": [0.5, 1.0],
                             "sigma_z": [0.5, 1.0]}},
    {"RandScaleIntensityd": {"prob": 0.15, "factors": 0.25}},
    {"RandScaleIntensityFixedMeand": {"prob": 0.15, "factors": 0.25, "preserve_range": True}},
    {"RandSimulateLowResolutiond": {"prob": 0.25, "zoom_range": [0.5, 1.0]}},
    {"RandAdjustContrastd": {"prob": 0.1, "gamma": [0.7, 1.5], "invert_image": True, "retain_stats": True}},
    {"RandAdjustContrastd": {"prob": 0.3, "gamma": [0.7, 1.5], "retain_stats": True}},
    {"RandFlipd": {"prob": 0.5, "spatial_axis": 0}},
    {"RandFlipd": {"prob": 0.5, "spatial_axis": 1}},
    {"RandFlipd": {"prob": 0.5, "spatial_axis": 2}},
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


def _check_list(spec: AugSpec) -> None:
    """Raise unless the augmentation is a list of entries (a lone dict or name is a common YAML slip)."""
    if isinstance(spec, dict | str):
        raise ValueError(f"augmentation must be a list of {{Name: {{arg: value}}}} entries, got {spec!r}")


def _check_kwargs(cls: type, name: str, kwargs: dict[str, Any], hidden: Sequence[str] = ()) -> None:
    """Raise naming arguments that ``cls.__init__`` does not take (albumentations only warns)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params) - {"self"})
    if unknown:
        allowed = sorted(set(params) - {"self", *hidden})
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
    _check_list(spec)
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


_BOTH, _IMAGE = ("image", "label"), ("image",)
_GRID = ("bilinear", "nearest")  # grid_sample: trilinear in 3D; both modes sample the same points
# MONAI dictionary transforms usable in 3D: name -> (keys it acts on, (default image interpolation, label
# interpolation) of its ``mode`` argument, or None when it has none). Spatial ones move image and label
# together, the label with nearest-neighbour interpolation; intensity and artefact ones touch the image only.
TRANSFORMS_3D: dict[str, tuple[tuple[str, ...], tuple[str, str] | None]] = {
    "RandAffined": (_BOTH, _GRID),  # rotation, scaling, shear, translation in one resampling
    "Rand3DElasticd": (_BOTH, _GRID),
    "RandGridDistortiond": (_BOTH, _GRID),
    "RandRotated": (_BOTH, _GRID),
    # torch interpolate: "nearest" would pick voxels half a voxel off the trilinear ones; "nearest-exact" not
    "RandZoomd": (_BOTH, ("trilinear", "nearest-exact")),
    "RandFlipd": (_BOTH, None),
    "RandAxisFlipd": (_BOTH, None),
    "RandRotate90d": (_BOTH, None),  # keeps the shape only in planes with equal sides
    "RandAdjustContrastd": (_IMAGE, None),  # gamma
    "RandGaussianNoised": (_IMAGE, None),
    "RandRicianNoised": (_IMAGE, None),
    "RandGaussianSmoothd": (_IMAGE, None),
    "RandGaussianSharpend": (_IMAGE, None),
    "RandScaleIntensityd": (_IMAGE, None),  # brightness: x * (1 + f)
    "RandShiftIntensityd": (_IMAGE, None),
    "RandStdShiftIntensityd": (_IMAGE, None),
    "RandScaleIntensityFixedMeand": (_IMAGE, None),  # contrast around the mean
    "RandBiasFieldd": (_IMAGE, None),
    "RandHistogramShiftd": (_IMAGE, None),
    "RandSimulateLowResolutiond": (_IMAGE, None),  # down- then up-sampling
}
_SET_BY_UNETSEG = ("keys", "allow_missing_keys", "lazy")


def _monai_entry(name: str, kwargs: dict[str, Any], where: str) -> Any:
    """The MONAI dictionary transform of one YAML entry, keys and per-key interpolation filled in."""
    import monai.transforms

    if name not in TRANSFORMS_3D:
        raise ValueError(f"unknown 3D augmentation '{name}' ({where}); expected one of {list(TRANSFORMS_3D)}")
    keys, modes = TRANSFORMS_3D[name]
    cls = getattr(monai.transforms, name)
    reserved = sorted(set(kwargs) & set(_SET_BY_UNETSEG))
    if reserved:
        raise ValueError(f"augmentation {name} ({where}): {reserved} are set by unetseg, not in the YAML")
    _check_kwargs(cls, name, kwargs, hidden=_SET_BY_UNETSEG)
    per_key = {}
    if modes is not None:
        mode = kwargs.get("mode", modes[0])
        if not isinstance(mode, str):
            raise ValueError(
                f"augmentation {name} ({where}): mode is the image's interpolation, one name such as "
                f"'{modes[0]}' (the label always uses '{modes[1]}'), got {mode!r}"
            )
        per_key["mode"] = (mode, modes[1])
    try:
        return cls(keys=keys, allow_missing_keys=True, **{**kwargs, **per_key})
    except (TypeError, ValueError, AssertionError) as err:
        raise ValueError(f"augmentation {name} ({where}): invalid arguments {kwargs}: {err}") from err


def _as_numpy(array: Any) -> np.ndarray:
    """A MONAI output (``MetaTensor``/tensor/array) as a plain numpy array, without a copy."""
    return array.as_tensor().numpy() if hasattr(array, "as_tensor") else np.asarray(array)


class Compose3D:
    """MONAI dictionary transforms as ``(image (C, X, Y, Z), label (X, Y, Z), rng) -> (image, label)``.

    Each transform sees ``{"image": (C, X, Y, Z), "label": (1, X, Y, Z)}`` and is re-seeded from ``rng`` on
    every call (``set_random_state``), so results follow the dataset's per-worker seeding. Inputs are copied,
    never modified; the image comes back float32, the label int64, both in the input shape.

    >>> aug = build_augmentation_3d([{"RandFlipd": {"prob": 1.0, "spatial_axis": 0}}])
    >>> image, label = np.arange(8.0).reshape(1, 2, 2, 2), np.arange(8).reshape(2, 2, 2)
    >>> out_image, out_label = aug(image, label, np.random.default_rng(0))
    >>> out_image[0, :, 0, 0].tolist(), out_label[:, 0, 0].tolist()
    ([4.0, 0.0], [4, 0])
    """

    def __init__(self, transforms: Sequence[Any], names: Sequence[str] | None = None) -> None:
        self.transforms = list(transforms)
        self.names = list(names) if names is not None else [type(t).__name__ for t in self.transforms]

    def __call__(
        self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        if image.ndim != 4:
            raise ValueError(f"3D augmentation expects an image (C, X, Y, Z), got shape {image.shape}")
        shape = image.shape
        data = {"image": torch.from_numpy(np.array(image, dtype=np.float32))}
        if label is not None:
            data["label"] = torch.from_numpy(np.array(label[None], dtype=np.float32))
        for seed, name, transform in zip(
            rng.integers(2**31, size=len(self.transforms)), self.names, self.transforms, strict=True
        ):
            transform.set_random_state(seed=int(seed))
            data = transform(data)
            if tuple(data["image"].shape) != shape:
                raise ValueError(
                    f"augmentation {name} changed the patch shape {shape} to {tuple(data['image'].shape)}; "
                    "training patches must keep their shape (keep_size, spatial_size, equal-sided planes)"
                )
        out_label = None if label is None else _as_numpy(data["label"])[0].astype(np.int64)
        return _as_numpy(data["image"]).astype(np.float32, copy=False), out_label

    def __repr__(self) -> str:
        return f"Compose3D({self.names})"


def build_augmentation_3d(spec: AugSpec) -> Compose3D | None:
    """``Compose3D`` of the MONAI transforms named in a YAML-style list (``TRANSFORMS_3D``), or ``None``.

    >>> build_augmentation_3d([{"RandAffined": {"prob": 0.2, "rotate_range": 0.5}}, "RandAxisFlipd"])
    Compose3D(['RandAffined', 'RandAxisFlipd'])
    """
    if not spec:
        return None
    _check_list(spec)
    transforms, names = [], []
    for i, item in enumerate(spec):
        name, kwargs = _entry(item, f"augmentation[{i}]")
        transforms.append(_monai_entry(name, kwargs, f"augmentation[{i}]"))
        names.append(name)
    return Compose3D(transforms, names)


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

"""Intensity normalization per case and channel, chosen by name (a registry), as nnU-Net does by modality.

* ``zscore``: ``(x - mean) / std`` over the case (MR); ``nonzero=True`` takes the mean and std of the non-zero
  voxels only (skull-stripped brains) and leaves the zero background at 0 (nnU-Net, MONAI), or with
  ``background="scale"`` normalizes it like every other voxel (it stays the darkest value).
* ``ct``: clip to a HU window ``[lo, hi]`` (default soft-tissue ``[-160, 240]``; ``window="auto"`` takes the
  0.5/99.5 percentiles of the foreground voxels of the training cases), then ``mode="unit"`` scales to
  ``[0, 1]`` and ``mode="zscore"`` subtracts the mean and divides by the std (the dataset's foreground
  statistics with ``window="auto"``, else those of the clipped case).
* ``percentile``: clip to the case's ``lower``/``upper`` percentiles (0.5/99.5), then z-score.
* ``minmax``: scale the case to ``[0, 1]``; ``rgb``: divide by 255 (8-bit images); ``none``: identity.

The default comes from the dataset (``DatasetSpec.default_normalization``): CT channels -> ``ct``, 8-bit 2D
images -> ``rgb``, anything else -> ``zscore``. A config is a name, a dict ``{"name": "ct", "window": [-100,
300]}`` (or ``{"ct": {"window": [-100, 300]}}``), or a list of those, one per input channel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from unetseg.data.formats.io import read_image, read_label
from unetseg.data.formats.layout import Case, DatasetSpec

EPS = 1e-8
DEFAULT_CT_WINDOW: tuple[float, float] = (-160.0, 240.0)


class ZScore:
    """Per-case z-score ``(x - mean) / std``. With ``nonzero`` the mean and std are those of the non-zero
    voxels and the zero voxels stay 0 (``background="zero"``, nnU-Net's and MONAI's) or are normalized like
    the rest (``background="scale"``: the background keeps its place below the darkest tissue).

    >>> [round(float(v), 3) for v in ZScore()(np.array([1.0, 2.0, 3.0], dtype=np.float32))]
    [-1.225, 0.0, 1.225]
    >>> [round(float(v), 3) for v in ZScore(nonzero=True, background="scale")(np.array([0.0, 2.0, 4.0]))]
    [-3.0, -1.0, 1.0]
    """

    def __init__(self, nonzero: bool = False, background: str = "zero") -> None:
        if background not in ("zero", "scale"):
            raise ValueError(f"zscore background must be 'zero' or 'scale', got {background!r}")
        self.nonzero = nonzero
        self.background = background

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        mask = x != 0 if self.nonzero else None
        if mask is None or not mask.any():
            return (x - x.mean()) / max(float(x.std()), EPS)
        values = x[mask]
        mean, std = float(values.mean()), max(float(values.std()), EPS)
        if self.background == "scale":
            return (x - mean) / std
        out = np.zeros_like(x)
        out[mask] = (values - mean) / std
        return out

    def __repr__(self) -> str:
        return f"ZScore(nonzero={self.nonzero}, background={self.background!r})"


class CTWindow:
    """Clip to the HU window ``[lo, hi]``, then scale to ``[0, 1]`` (``unit``) or standardize (``zscore``).

    >>> CTWindow(window=(-100, 100))(np.array([-1000.0, 0.0, 1000.0])).tolist()
    [0.0, 0.5, 1.0]
    """

    def __init__(
        self,
        window: Sequence[float] = DEFAULT_CT_WINDOW,
        mode: str = "unit",
        mean: float | None = None,
        std: float | None = None,
    ) -> None:
        if len(window) != 2 or not window[0] < window[1]:
            raise ValueError(f"ct window must be [lo, hi] with lo < hi, got {list(window)}")
        if mode not in ("unit", "zscore"):
            raise ValueError(f"ct mode must be 'unit' or 'zscore', got '{mode}'")
        self.window = (float(window[0]), float(window[1]))
        self.mode, self.mean, self.std = mode, mean, std

    def __call__(self, x: np.ndarray) -> np.ndarray:
        lo, hi = self.window
        x = np.clip(np.asarray(x, dtype=np.float32), lo, hi)
        if self.mode == "unit":
            return (x - lo) / (hi - lo)
        mean = float(x.mean()) if self.mean is None else self.mean
        std = float(x.std()) if self.std is None else self.std
        return (x - mean) / max(std, EPS)

    def __repr__(self) -> str:
        return f"CTWindow(window={self.window}, mode='{self.mode}', mean={self.mean}, std={self.std})"


class Percentile:
    """Clip to the case's ``lower``/``upper`` percentiles (over non-zero voxels with ``nonzero``), z-score."""

    def __init__(self, lower: float = 0.5, upper: float = 99.5, nonzero: bool = False) -> None:
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper, self.nonzero = lower, upper, nonzero

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        ref = x[x != 0] if self.nonzero and (x != 0).any() else x
        lo, hi = np.percentile(ref, [self.lower, self.upper])
        x = np.clip(x, lo, hi)
        ref = np.clip(ref, lo, hi)
        return ((x - ref.mean()) / max(float(ref.std()), EPS)).astype(np.float32)

    def __repr__(self) -> str:
        return f"Percentile(lower={self.lower}, upper={self.upper}, nonzero={self.nonzero})"


class MinMax:
    """Scale the case to ``[0, 1]`` (constant cases become 0)."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        lo, hi = float(x.min()), float(x.max())
        return (x - lo) / max(hi - lo, EPS)

    def __repr__(self) -> str:
        return "MinMax()"


class ScaleRGB:
    """Divide 8-bit intensities by 255 (nnU-Net's ``rgb_to_0_1``)."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32) / 255.0

    def __repr__(self) -> str:
        return "ScaleRGB()"


class NoNorm:
    """Identity (cast to float32)."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    def __repr__(self) -> str:
        return "NoNorm()"


NORMALIZATIONS: dict[str, Callable[..., Callable[[np.ndarray], np.ndarray]]] = {
    "zscore": ZScore,
    "ct": CTWindow,
    "percentile": Percentile,
    "minmax": MinMax,
    "rgb": ScaleRGB,
    "none": NoNorm,
}

NormConfig = str | dict[str, Any] | None


class ChannelNormalizer:
    """Applies one normalizer per channel to an image ``(C, *spatial)``; returns float32 of the same shape.

    >>> norm = ChannelNormalizer([ZScore(), CTWindow()])
    >>> norm(np.zeros((2, 4, 4, 4), dtype=np.float32)).shape
    (2, 4, 4, 4)
    """

    def __init__(self, normalizers: Sequence[Callable[[np.ndarray], np.ndarray]]) -> None:
        self.normalizers = list(normalizers)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.shape[0] != len(self.normalizers):
            raise ValueError(
                f"image has {image.shape[0]} channels; the normalization has {len(self.normalizers)}"
            )
        return np.stack(
            [norm(channel) for norm, channel in zip(self.normalizers, image, strict=True)]
        ).astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"ChannelNormalizer({self.normalizers})"


def _parse(config: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``"zscore"`` / ``{"name": "ct", ...}`` / ``{"ct": {...}}`` -> ``(name, kwargs)``."""
    if isinstance(config, str):
        return config, {}
    if isinstance(config, dict):
        if "name" in config:
            return str(config["name"]), {k: v for k, v in config.items() if k != "name"}
        if len(config) == 1:
            name, kwargs = next(iter(config.items()))
            return str(name), dict(kwargs or {})
    raise ValueError(
        f"normalization must be a name, {{'name': ..., **kwargs}} or {{name: kwargs}}, got {config!r}"
    )


def estimate_ct_window(
    spec: DatasetSpec,
    cases: Sequence[Case],
    channel: int = 0,
    percentiles: tuple[float, float] = (0.5, 99.5),
    max_cases: int = 16,
    voxels_per_case: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float, float]:
    """``(lo, hi, mean, std)`` of foreground intensities sampled from up to ``max_cases`` labelled cases."""
    rng = np.random.default_rng(seed)
    labelled = [c for c in cases if c.label is not None][:max_cases]
    if not labelled:
        raise ValueError("window='auto' needs labelled training cases to estimate the CT window")
    samples = []
    for case in labelled:
        image, _ = read_image(case, spec)
        label = read_label(case, spec)
        values = (
            image[channel][label > 0] if label is not None and (label > 0).any() else image[channel].ravel()
        )
        samples.append(rng.choice(values, size=min(voxels_per_case, values.size), replace=False))
    values = np.concatenate(samples)
    lo, hi = np.percentile(values, percentiles)
    clipped = np.clip(values, lo, hi)
    return float(lo), float(hi), float(clipped.mean()), float(clipped.std())


def build_normalizer(config: str | dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """One channel's normalizer from a config (name or dict); raises naming unknown names or arguments."""
    name, kwargs = _parse(config)
    if name not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization '{name}'; expected one of {list(NORMALIZATIONS)}")
    try:
        return NORMALIZATIONS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"normalization '{name}': invalid arguments {kwargs}: {err}") from err


def check_normalization(
    config: NormConfig | Sequence[str | dict[str, Any]], in_channels: int, channel_names: Sequence[str] = ()
) -> None:
    """Raise naming the bad entry if ``config`` cannot normalize ``in_channels`` channels (reads no data).

    >>> check_normalization(["zscore", {"name": "ct", "window": "auto"}], in_channels=2)
    >>> check_normalization("zcore", in_channels=1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown normalization 'zcore'; expected one of ['zscore', 'ct', ...]
    """
    items = list(config) if isinstance(config, list | tuple) else [config] * in_channels
    if len(items) != in_channels:
        names = f" {list(channel_names)}" if channel_names else ""
        raise ValueError(
            f"normalization lists {len(items)} entries; the dataset has {in_channels} input "
            f"channel(s){names}: give one name/dict for all, or one per channel"
        )
    for item in items:
        if item is None:
            continue
        name, kwargs = _parse(item)
        if kwargs.get("window") == "auto":  # estimated from the training cases in build_normalization
            kwargs = {k: v for k, v in kwargs.items() if k != "window"}
        build_normalizer({"name": name, **kwargs})


def build_normalization(
    config: NormConfig | Sequence[str | dict[str, Any]] = None,
    spec: DatasetSpec | None = None,
    in_channels: int | None = None,
    cases: Sequence[Case] = (),
) -> ChannelNormalizer:
    """Per-channel normalizer from a config, the dataset's default (``config=None``) and its training cases.

    ``cases`` are only read for ``{"name": "ct", "window": "auto"}``.

    >>> build_normalization("zscore", in_channels=2)
    ChannelNormalizer([ZScore(nonzero=False, background='zero'), ZScore(nonzero=False, background='zero')])
    """
    channels = in_channels if in_channels is not None else (spec.in_channels if spec is not None else None)
    if channels is None:
        raise ValueError("build_normalization needs spec or in_channels")
    if config is None:
        if spec is None or not spec.default_normalization:
            config = "zscore"
        else:
            config = list(spec.default_normalization)
    configs = list(config) if isinstance(config, list | tuple) else [config] * channels
    if len(configs) != channels:
        raise ValueError(
            f"normalization lists {len(configs)} entries; expected one per input channel ({channels})"
        )
    normalizers = []
    for channel, item in enumerate(configs):
        name, kwargs = _parse(item)
        if name == "ct" and kwargs.get("window") == "auto":
            if spec is None:
                raise ValueError("ct window='auto' needs the dataset spec and its training cases")
            lo, hi, mean, std = estimate_ct_window(spec, cases or spec.cases_train, channel)
            kwargs = {**kwargs, "window": (lo, hi)}
            if kwargs.get("mode") == "zscore":
                kwargs.setdefault("mean", mean)
                kwargs.setdefault("std", std)
        normalizers.append(build_normalizer({"name": name, **kwargs}))
    return ChannelNormalizer(normalizers)

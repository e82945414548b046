"""What predict must redo to new images as the data module did in training, recorded in checkpoints."""

from __future__ import annotations

from typing import Any

from unetseg.data.normalize import NORMALIZATIONS, ChannelNormalizer


def preprocessing_config(datamodule: Any) -> dict[str, Any]:
    """What predict must redo to new images as the data module did in training (saved in checkpoints).

    ``normalization`` (:func:`normalization_config`), and when the data module has them ``target_spacing``
    (resampling), ``resize`` (2D images resized to a fixed size) and ``slice_axis`` (2D nets on volumes).
    """
    out: dict[str, Any] = {"normalization": normalization_config(datamodule)}
    for key in ("target_spacing", "resize", "slice_axis"):
        value = getattr(datamodule, key, None)
        if value is not None:
            out[key] = list(value) if isinstance(value, tuple | list) else value
    return out


def normalization_config(datamodule: Any) -> list[dict[str, Any]] | str | dict[str, Any] | None:
    """The per-case intensity normalization a data module applies, as a config for ``build_normalization``.

    From its ``normalizer`` or ``loader.normalizer`` (a ``ChannelNormalizer``: one resolved ``{"name",
    **arguments}`` per channel, e.g. a CT window estimated from the training cases), else its
    ``normalization`` hyperparameter, else ``"zscore"`` for the built-in synthetic data (``root=None``: images
    are standardized per image); ``None`` when unknown.
    """
    normalizer = getattr(datamodule, "normalizer", None) or getattr(
        getattr(datamodule, "loader", None), "normalizer", None
    )
    if isinstance(normalizer, ChannelNormalizer):
        names = {cls: name for name, cls in NORMALIZATIONS.items()}
        if all(type(n) in names for n in normalizer.normalizers):
            return [{"name": names[type(n)], **vars(n)} for n in normalizer.normalizers]
    hparams = getattr(datamodule, "hparams", {}) or {}
    config = hparams.get("normalization")
    if config is not None and "auto" not in repr(config):
        return config
    if "root" in hparams and hparams["root"] is None:
        return "zscore"
    return None

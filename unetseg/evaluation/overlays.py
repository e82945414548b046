"""Validation overlays: image, ground truth and prediction of a few samples, to W&B and to PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

# Class colours (RGB), index 0 (background) unused; matplotlib's tab10 without its grey.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (214, 39, 40),
    (44, 160, 44),
    (31, 119, 180),
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
)


def middle_slice(array: np.ndarray, spatial_dims: int) -> np.ndarray:
    """The middle slice along the last spatial axis of a 3D array (``(*spatial)`` or ``(C, *spatial)``)."""
    return array[..., array.shape[-1] // 2] if spatial_dims == 3 else array


def to_display(image: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` float image -> ``(H, W)`` (channel 0) or ``(H, W, 3)`` (3 channels) uint8, contrast
    stretched between the 1st and 99th percentiles."""
    array = np.asarray(image, dtype=np.float32)
    array = np.moveaxis(array[:3], 0, -1) if array.shape[0] == 3 else array[0]
    lo, hi = np.percentile(array, [1, 99]) if array.size else (0.0, 1.0)
    scaled = (array - lo) / max(float(hi - lo), 1e-8)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def overlay(display: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)``: ``display`` (grey or RGB) with the non-zero classes of ``mask`` blended in."""
    rgb = np.repeat(display[..., None], 3, axis=-1) if display.ndim == 2 else display.copy()
    rgb = rgb.astype(np.float32)
    colours = np.asarray(PALETTE, dtype=np.float32)[np.asarray(mask) % len(PALETTE)]
    labelled = np.asarray(mask) > 0
    rgb[labelled] = (1 - alpha) * rgb[labelled] + alpha * colours[labelled]
    return rgb.round().astype(np.uint8)


def overlay_panel(image: np.ndarray, label: np.ndarray, pred: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``[image | ground-truth overlay | prediction overlay]`` side by side, RGB uint8 ``(H, 3W, 3)``.

    >>> panel = overlay_panel(np.random.rand(1, 8, 8), np.eye(8, dtype=int), np.zeros((8, 8), int))
    >>> panel.shape, panel.dtype
    ((8, 24, 3), dtype('uint8'))
    """
    display = to_display(image)
    raw = overlay(display, np.zeros_like(label))
    return np.concatenate([raw, overlay(display, label, alpha), overlay(display, pred, alpha)], axis=1)


class SegmentationOverlays(Callback):
    """Logs ``num_samples`` validation samples every ``every_n_epochs`` epochs as overlays (global rank 0).

    The first samples of the validation set (the same ones every time) are logged to W&B under
    ``val/overlays`` as ``wandb.Image`` with ``ground_truth`` and ``prediction`` masks named by the module's
    ``class_names``, and saved as PNG panels ``[image | ground truth | prediction]`` in
    ``<log_dir>/overlays/epoch<NNN>_<i>.png``. 3D samples show their middle slice along the last axis.
    ``every_n_epochs=0`` turns it off. Uses the predictions ``validation_step`` returns (``{"pred": ...}``).

    In YAML: ``trainer.callbacks: [{class_path: unetseg.evaluation.SegmentationOverlays, init_args:
    {every_n_epochs: 5}}]``.

    Args:
        every_n_epochs: log at epochs 0, n, 2n, ...; 0 disables the callback.
        num_samples: samples per logging epoch.
        output_dir: folder for the PNG files (an ``overlays/`` subfolder); ``None`` uses the trainer's
            ``log_dir``.
        alpha: opacity of the mask colours.
    """

    def __init__(
        self, every_n_epochs: int = 1, num_samples: int = 4, output_dir: str | None = None, alpha: float = 0.5
    ) -> None:
        if every_n_epochs < 0 or num_samples < 1:
            raise ValueError(
                f"every_n_epochs={every_n_epochs!r} must be >= 0 and num_samples={num_samples!r} >= 1"
            )
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha={alpha!r} must be in (0, 1]")
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.output_dir = output_dir
        self.alpha = alpha
        self.samples: list[dict[str, Any]] = []
        self.saved: list[Path] = []

    def _due(self, trainer: L.Trainer) -> bool:
        """Whether this validation epoch logs overlays (on rank 0)."""
        return (
            self.every_n_epochs > 0
            and not trainer.sanity_checking
            and trainer.current_epoch % self.every_n_epochs == 0
        )

    def _active(self, trainer: L.Trainer) -> bool:
        """Whether this process collects samples now: a due epoch, global rank 0."""
        return trainer.is_global_zero and self._due(trainer)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.samples = []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if len(self.samples) >= self.num_samples or not self._active(trainer) or "label" not in batch:
            return
        if not isinstance(outputs, dict) or "pred" not in outputs:
            raise RuntimeError("SegmentationOverlays needs validation_step to return {'pred': ...}")
        pred = outputs["pred"].detach().cpu().numpy()
        dims = pred.ndim - 1
        ids, slices = batch.get("case_id"), batch.get("slice_index")
        for k in range(min(pred.shape[0], self.num_samples - len(self.samples))):
            caption = str(ids[k]) if ids is not None else f"batch {batch_idx} sample {k}"
            if slices is not None:
                caption += f" slice {int(slices[k])}"
            self.samples.append(
                {
                    "image": middle_slice(batch["image"][k].detach().float().cpu().numpy(), dims),
                    "label": middle_slice(batch["label"][k].detach().cpu().numpy(), dims).astype(np.uint8),
                    "pred": middle_slice(pred[k], dims).astype(np.uint8),
                    "caption": caption,
                }
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):
            return
        log_dir = self.output_dir or trainer.log_dir or trainer.default_root_dir  # log_dir: a collective
        if not self.samples or not trainer.is_global_zero:
            return
        from PIL import Image

        folder = Path(log_dir) / "overlays"
        folder.mkdir(parents=True, exist_ok=True)
        epoch = trainer.current_epoch
        for i, s in enumerate(self.samples):
            path = folder / f"epoch{epoch:03d}_{i}.png"
            Image.fromarray(overlay_panel(s["image"], s["label"], s["pred"], self.alpha)).save(path)
            self.saved.append(path)
        class_labels = dict(enumerate(getattr(pl_module, "class_names", [])))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    key="val/overlays",
                    images=[to_display(s["image"]) for s in self.samples],
                    step=trainer.global_step,
                    caption=[s["caption"] for s in self.samples],
                    masks=[
                        {
                            "ground_truth": {"mask_data": s["label"], "class_labels": class_labels},
                            "prediction": {"mask_data": s["pred"], "class_labels": class_labels},
                        }
                        for s in self.samples
                    ],
                )
        self.samples = []

"""The LightningModule: a segmentation network trained with a named loss, logged with Dice and IoU."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection

from unetseg.losses import SegmentationLoss
from unetseg.metrics import segmentation_metrics, summarize

STAGES = ("train", "val", "test")

# Learning-rate factor as a function of training progress t in [0, 1].
LR_SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda t: 1.0,
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
    "poly": lambda t: (1.0 - t) ** 0.9,
}


class SegmentationModule(L.LightningModule):
    """Wraps a segmentation net (``net(x) -> logits``) with loss, optimizer, scheduler and metrics.

    Batches are dicts ``{"image": (B, C_in, *spatial) float, "label": (B, *spatial) int}``. Logged keys:
    ``train/loss``, ``{val,test}/loss``, ``{stage}/dice``, ``{stage}/iou`` (mean over the foreground classes
    unless ``include_background``) and ``{stage}/dice/<class name>``, ``{stage}/iou/<class name>``.

    >>> from unetseg import UNet
    >>> module = SegmentationModule(UNet(channels=(4, 8)), class_names=["background", "organ"])
    >>> module(torch.rand(2, 1, 32, 32)).shape
    torch.Size([2, 2, 32, 32])

    Args:
        net: the network; its ``out_channels`` attribute (or ``len(class_names)``) gives the class count.
        loss: ``"dice_ce"`` (default), ``"dice"``, ``"ce"`` or ``"focal"`` (see ``unetseg.losses``).
        class_names: one name per output channel, index 0 the background; linked from the data in the CLI.
        include_background: whether the mean Dice/IoU includes class 0.
        optimizer: a callable ``params -> Optimizer`` (``class_path`` + ``init_args`` in YAML).
        scheduler: optional callable ``optimizer -> LRScheduler``, stepped per epoch; replaces lr_schedule.
        lr_schedule: per-step learning-rate factor over the whole fit when no ``scheduler`` is given:
            ``"cosine"`` (to 0), ``"poly"`` ((1 - t)^0.9, nnU-Net's) or ``"constant"``. Its length is the
            trainer's ``estimated_stepping_batches``, so it follows ``max_epochs``/``max_steps`` untouched.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: str = "dice_ce",
        class_names: list[str] | None = None,
        include_background: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        lr_schedule: str = "cosine",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.loss_fn = SegmentationLoss(loss)
        num_classes = int(getattr(net, "out_channels", 0) or len(class_names or []))
        if num_classes < 2:
            raise ValueError(f"net.out_channels={num_classes}: a segmentation net needs at least 2 classes")
        if class_names is None:
            class_names = ["background", *(f"class_{i}" for i in range(1, num_classes))]
        if len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} entries {class_names} "
                f"but the net has {num_classes} outputs"
            )
        self.class_names = list(class_names)
        self.include_background = include_background
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={lr_schedule!r} is not one of {sorted(LR_SCHEDULES)}")
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.lr_schedule = lr_schedule
        base = segmentation_metrics(num_classes)
        for stage in STAGES:  # attributes, not a ModuleDict: "train" would shadow nn.Module.train
            setattr(self, f"{stage}_metrics", base.clone(prefix=f"{stage}/"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        image, label = batch["image"], batch["label"]
        logits = self(image)
        loss = self.loss_fn(logits, label)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{stage} loss is {loss.item()} at epoch {self.current_epoch}, "
                f"global step {self.global_step}: "
                "training stopped before the weights are corrupted (checkpoints saved so far are kept). "
                "Lower the learning rate, use precision=32 or bf16-mixed, or check the images for NaN/inf."
            )
        self._metrics(stage).update(logits.detach().argmax(1), label)
        train = stage == "train"  # per step while training (key train/loss), per epoch otherwise
        self.log(
            f"{stage}/loss",
            loss,
            on_step=train,
            on_epoch=not train,
            batch_size=image.shape[0],
            sync_dist=not train,
            prog_bar=True,
        )
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch["image"]).argmax(1)

    def _metrics(self, stage: str) -> MetricCollection:
        return getattr(self, f"{stage}_metrics")

    def _log_metrics(self, stage: str) -> None:
        values = summarize(self._metrics(stage).compute(), self.class_names, self.include_background)
        means = {key: values.pop(key) for key in (f"{stage}/dice", f"{stage}/iou")}
        self.log_dict(means, prog_bar=True)
        self.log_dict(values)
        self._metrics(stage).reset()

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        if self.scheduler is None:
            total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer else 1
            factor = LR_SCHEDULES[self.lr_schedule]
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: factor(min(step / total, 1.0))
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler(optimizer), "monitor": "val/loss"},
        }

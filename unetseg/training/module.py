"""The LightningModule: a segmentation network trained with a named loss, logged with Dice and IoU."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import nn
from torchmetrics import MetricCollection

from unetseg.data.preprocessing import preprocessing_config
from unetseg.inference.checkpoint import CheckpointModel
from unetseg.inference.inferer import Inferer
from unetseg.losses import DeepSupervisionLoss, SegmentationLoss
from unetseg.metrics import segmentation_metrics, to_logged_scalars

STAGES = ("train", "val", "test")

# Learning-rate factor as a function of training progress t in [0, 1] (see fit_progress).
LR_SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda t: 1.0,
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
    "poly": lambda t: (1.0 - t) ** 0.9,
}


# Words of torch.optim's range errors ("Invalid learning rate: -0.1") -> (the argument, its valid values).
OPTIMIZER_RANGES: dict[str, tuple[str, str]] = {
    "learning rate": ("lr", ">= 0, typically 1e-4 to 1e-2"),
    "weight_decay": ("weight_decay", ">= 0, typically 0 to 0.1"),
    "epsilon": ("eps", ">= 0, typically 1e-8"),
    "beta parameter": ("betas", "two values in [0, 1), typically [0.9, 0.999]"),
    "momentum": ("momentum", ">= 0, typically 0.9"),
}


def check_optimizer(optimizer: OptimizerCallable) -> None:
    """Build ``optimizer`` on one dummy parameter, so that a value out of range (a negative learning rate or
    weight decay) fails at construction, naming the key and its valid values, not at the first step.

    >>> check_optimizer(lambda params: torch.optim.SGD(params, lr=-1.0))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: model.optimizer.init_args.lr is out of range (Invalid learning rate: -1.0): give lr >= 0, ...
    """
    try:
        optimizer([nn.Parameter(torch.zeros(1))])
    except ValueError as err:
        words = next((w for w in OPTIMIZER_RANGES if w in str(err)), None)
        if words is None:
            raise ValueError(f"model.optimizer: {err}") from err
        key, valid = OPTIMIZER_RANGES[words]
        raise ValueError(
            f"model.optimizer.init_args.{key} is out of range ({err}): give {key} {valid}"
        ) from err


def net_config(net: nn.Module) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` that rebuild ``net``, stored in checkpoints; ``None`` if unknown.

    Taken from the net's ``init_args`` attribute (a dict of its constructor arguments) when it has one, else
    from the parsed config when LightningCLI instantiates the module (``model.net``, with linked values).
    """
    init_args = getattr(net, "init_args", None)
    if isinstance(init_args, dict):
        cls = type(net)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(init_args)}
    # Private, as no public accessor exists: the config LightningCLI is instantiating (with linked values);
    # save_hyperparameters, its public reader, would store a net built in Python as an nn.Module and warn.
    given = (_given_hyperparameters.get() or {}).get("net")
    if isinstance(given, dict) and "class_path" in given:
        return {"class_path": given["class_path"], "init_args": dict(given.get("init_args") or {})}
    return None


def fit_progress(trainer: L.Trainer) -> Callable[[int], float]:
    """Progress ``t`` in [0, 1] of ``trainer``'s fit after ``step`` optimizer steps: ``step`` over the
    trainer's step estimate (``estimated_stepping_batches``, from ``max_epochs``/``max_steps``) or, when
    ``max_time`` bounds the fit, the time spent over ``max_time``, whichever is further.

    >>> progress = fit_progress(L.Trainer(max_steps=10, logger=False, enable_checkpointing=False))
    >>> progress(0), progress(5), progress(20)
    (0.0, 0.5, 1.0)
    """
    total = float(trainer.estimated_stepping_batches)  # inf when only max_time bounds the fit
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)  # added for max_time

    def progress(step: int) -> float:
        t = step / total if 0 < total < math.inf else 0.0
        remaining = timer.time_remaining() if timer is not None else None
        if remaining is not None:
            elapsed = timer.time_elapsed()
            t = max(t, elapsed / max(elapsed + remaining, 1e-9))
        return min(t, 1.0)

    return progress


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss during training, validation or testing; the message says where and what to change."""


class SegmentationModule(L.LightningModule):
    """Wraps a segmentation net (``net(x) -> logits``) with loss, optimizer, scheduler and metrics.

    A net that returns a list of logits in training mode (deep supervision, full resolution first, e.g.
    ``UNet(deep_supervision=True)``) is trained with :class:`~unetseg.losses.DeepSupervisionLoss` around
    ``loss`` (nnU-Net's weights); the metrics see the full-resolution output. Validation and test run in eval
    mode, where such a net returns one tensor.

    Batches are dicts ``{"image": (B, C_in, *spatial) float, "label": (B, *spatial) int}``. Logged keys:
    ``train/loss``, ``{val,test}/loss``, ``{stage}/dice``, ``{stage}/iou`` (mean over the foreground classes
    unless ``include_background``) and ``{stage}/dice/<class name>``, ``{stage}/iou/<class name>``.

    >>> from unetseg import UNet
    >>> module = SegmentationModule(UNet(channels=(4, 8)), class_names=["background", "organ"])
    >>> module(torch.rand(2, 1, 32, 32)).shape
    torch.Size([2, 2, 32, 32])

    Args:
        net: the network; its ``out_channels`` attribute (or ``len(class_names)``) gives the class count.
        loss: ``"dice_ce"`` (default), ``"dice_ce_bg"``, ``"dice_ce_image"``, ``"dice"``, ``"ce"`` or
            ``"focal"`` (see ``unetseg.losses``).
        class_names: one name per output channel, index 0 the background; linked from the data in the CLI.
        include_background: whether the mean Dice/IoU includes class 0.
        optimizer: a callable ``params -> Optimizer`` (``class_path`` + ``init_args`` in YAML).
        scheduler: the learning-rate schedule. A name: a factor stepped per optimizer step over the whole fit,
            ``"cosine"`` (to 0), ``"poly"`` ((1 - t)^0.9, nnU-Net's) or ``"constant"``; the progress ``t`` is
            that of :func:`fit_progress` (steps of ``max_epochs``/``max_steps``, or the time of ``max_time``,
            whichever is further). Or a callable ``optimizer -> LRScheduler`` (``class_path`` + ``init_args``
            in YAML, e.g. ``torch.optim.lr_scheduler.StepLR``), stepped per epoch and given ``val/loss``.
        inference: how validation, test and predict turn whole images into logits (sliding window, flip TTA,
            see :class:`~unetseg.inference.Inferer`); ``None`` runs ``forward`` on the whole image. Training
            always runs ``forward`` on its patches.

    Checkpoints record the net (``hyper_parameters["net"]``: class path and constructor arguments, see
    :func:`net_config`) and the data's preprocessing (``checkpoint["preprocessing"]``, see
    :func:`~unetseg.data.preprocessing.preprocessing_config`), so that
    :meth:`load_for_inference` rebuilds the module from the checkpoint file alone.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: str = "dice_ce",
        class_names: list[str] | None = None,
        include_background: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: str | LRSchedulerCallable = "cosine",
        inference: Inferer | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "inference"])
        self.hparams["net"] = net_config(net)
        if isinstance(scheduler, str):
            self.hparams["scheduler"] = scheduler
        self.hparams["inference"] = None if inference is None else inference.config()
        self.net = net
        self.inference = inference
        self.preprocessing: dict[str, Any] = {}  # the data's normalization etc., saved in checkpoints
        self.loss_fn = SegmentationLoss(loss)
        self.deep_supervision_loss = DeepSupervisionLoss(self.loss_fn)  # for nets that return a list
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
        if isinstance(scheduler, str) and scheduler not in LR_SCHEDULES:
            raise ValueError(
                f"scheduler={scheduler!r} is not one of {sorted(LR_SCHEDULES)} "
                "(or give a class_path, e.g. torch.optim.lr_scheduler.StepLR)"
            )
        check_optimizer(optimizer)
        self.optimizer = optimizer
        self.scheduler = scheduler
        base = segmentation_metrics(num_classes)
        for stage in STAGES:  # attributes, not a ModuleDict: "train" would shadow nn.Module.train
            setattr(self, f"{stage}_metrics", base.clone(prefix=f"{stage}/"))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.net(x)

    def infer(self, image: torch.Tensor) -> torch.Tensor:
        """Logits over whole images, as validation, test and predict compute them (``inference``)."""
        return self(image) if self.inference is None else self.inference(self, image)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        image, label = batch["image"], batch["label"]
        outputs = self(image) if stage == "train" else self.infer(image)
        deep = isinstance(outputs, (list, tuple))  # deep supervision: logits per level, full resolution first
        loss = (self.deep_supervision_loss if deep else self.loss_fn)(outputs, label)
        logits = outputs[0] if deep else outputs
        if not torch.isfinite(loss):
            raise NonFiniteLossError(self._non_finite_message(stage, loss.detach().item()))
        # max(1).indices == argmax(1) (first maximum on ties) but ~7x faster on CPU over the channel dim
        pred = logits.detach().max(1).indices
        self._metrics(stage).update(pred, label)
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
        return {"loss": loss, "pred": pred}  # callbacks get the predictions in on_*_batch_end

    def _non_finite_message(self, stage: str, loss: float) -> str:
        """What a non-finite ``stage`` loss means for this run: where, the weights' state, what to do."""
        weights = [p.detach() for p in self.parameters() if p.numel()]
        finite = [w for w in weights if torch.isfinite(w).all()]
        broken = len(weights) - len(finite)
        largest = max((float(w.abs().max()) for w in finite), default=0.0)
        state = (
            f"{broken} of {len(weights)} weight tensors already hold NaN/inf"
            if broken
            else f"the weights are still finite (largest |w| {largest:.3g})"
        )
        trainer = self._trainer
        optimizers = trainer.optimizers if trainer is not None else []
        group = optimizers[0].param_groups[0] if optimizers else {}
        lr = group.get("initial_lr", group.get("lr"))  # the configured value, before the schedule
        precision = str(trainer.precision) if trainer is not None else "32-true"
        callbacks = trainer.checkpoint_callbacks if trainer is not None else []
        saved = any(getattr(c, "best_model_path", "") for c in callbacks)
        kept = "the checkpoints saved before are kept" if saved else "no checkpoint was saved yet"
        if self.global_step == 0:
            advice = "before any optimizer step, so check the images and labels for NaN/inf"
        else:
            now = f" (model.optimizer.init_args.lr: {lr:.3g})" if lr else ""
            advice = f"lower the learning rate{now}"
            if precision.startswith("16"):  # float16 overflows past 65504; bfloat16 has float32's range
                advice += f", or train in bf16-mixed or 32-true instead of {precision}"
        return (
            f"{stage} loss is {loss} at epoch {self.current_epoch}, global step {self.global_step} "
            f"({precision} precision); {state}; training stopped ({kept}): {advice}"
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._step(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.infer(batch["image"]).argmax(1)

    def _metrics(self, stage: str) -> MetricCollection:
        return getattr(self, f"{stage}_metrics")

    def _log_metrics(self, stage: str) -> None:
        values = to_logged_scalars(self._metrics(stage).compute(), self.class_names, self.include_background)
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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.preprocessing = preprocessing_config(datamodule)
        checkpoint["preprocessing"] = dict(self.preprocessing)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.preprocessing = dict(checkpoint.get("preprocessing") or {})

    @classmethod
    def load_for_inference(
        cls, checkpoint_path: str | Path, map_location: str | torch.device = "cpu"
    ) -> SegmentationModule:
        """The module of a checkpoint, in eval mode, rebuilt from the file alone (no config, no data).

        Raises ``FileNotFoundError``/``ValueError`` naming the file when it is missing, unreadable, not a
        ``SegmentationModule`` checkpoint or its weights do not fit the net it records. Reading and checking
        the file is :meth:`unetseg.inference.CheckpointModel.load`'s (the net's weights are the module's only
        state); this adds the loss, metrics and optimizer settings the checkpoint records.
        """
        loaded = CheckpointModel.load(checkpoint_path, map_location)
        names = set(inspect.signature(cls.__init__).parameters) - {"self", "net", "optimizer", "scheduler"}
        kwargs = {k: v for k, v in loaded.hparams.items() if k in names}
        module = cls(loaded.net, **{**kwargs, "inference": loaded.inference})
        module.hparams["net"] = loaded.hparams["net"]
        module.preprocessing = dict(loaded.preprocessing)
        return module.eval()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        if not isinstance(self.scheduler, str):
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler(optimizer), "monitor": "val/loss"},
            }
        factor = LR_SCHEDULES[self.scheduler]
        progress = fit_progress(self._trainer) if self._trainer is not None else lambda step: 0.0
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(progress(step)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

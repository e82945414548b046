"""Framework overhead: unetseg's training step through the Lightning ``Trainer`` vs a plain PyTorch loop.

Both sides train the same net (a copy of the CLI's, same initial weights) on the same batches, generated once
from the built-in synthetic data and held in memory, with the same optimizer (the config's AdamW), per-step
LR schedule, loss and precision. The trainer is the one ``python train.py`` builds
(``unetseg.training.cli.build_cli``
on the base config): ModelCheckpoint, progress bar, CSVLogger + W&B (offline), ``log_every_n_steps`` of the
config, the module's per-step ``train/loss`` logging and training-metric updates. There is no validation on
either side (the training loader only), so the trainer's epoch-end work is the training metrics' compute and
log plus the checkpoint save.

Interleaving: a callback runs one step of each plain loop (``plain``: forward, loss, backward, optimizer and
scheduler step; ``plain_metrics``: the same plus the module's Dice/IoU metric update, and their compute after
each epoch's last batch) before every trainer step, and once more when training ends. Trainer step ``j`` is
timed from the end of that callback to its next call, so it includes every hook, log and progress-bar update
around the step, and for an epoch's last step the epoch-end work. The headline ratio is, per epoch, the sum of
the trainer's step times over the sum of the plain steps run around them (the mean of the plain steps right
before and right after each trainer step), median over the epochs; epoch 0 is warm-up. Per-step ratios by
kind of step (plain steps, steps that write the loggers, epochs' last steps) say where the difference is.

    python -m benchmarks.framework_overhead            # full: 8 timed epochs of 16 steps, ~3 min
    python -m benchmarks.framework_overhead --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmarks._common import (
    autocast,
    base_parser,
    interleave,
    parse,
    ratio_summary,
    setup,
    summary,
    write_result,
)

NAME = "framework_overhead"
TARGET_RATIO = 1.03


class PlainLoop:
    """A hand-written training loop over ``batches``, one step per call (optionally with the metrics)."""

    def __init__(
        self,
        module: Any,
        batches: list[dict[str, torch.Tensor]],
        precision: str,
        metrics: bool,
        total: int,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        from unetseg.losses import SegmentationLoss
        from unetseg.metrics import segmentation_metrics
        from unetseg.training.module import LR_SCHEDULES

        # the same layout as the trainer's net, which the Performance callback converts in setup (the copy is
        # taken before that): otherwise only one side would run channels-last
        self.net: nn.Module = copy.deepcopy(module.net).to(memory_format=memory_format)
        self.net.train()
        self.memory_format = memory_format
        self.loss_fn = SegmentationLoss(module.loss_fn.name)
        self.optimizer = module.optimizer(self.net.parameters())
        factor = LR_SCHEDULES[module.scheduler]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: factor(min(step / total, 1.0))
        )
        self.metrics = segmentation_metrics(module.net.out_channels) if metrics else None
        self.batches = batches
        self.precision = precision
        self.index = 0

    def step(self) -> float:
        """One training step on the next batch (and the epoch-end metric compute after the last batch)."""
        start = time.perf_counter()
        batch = self.batches[self.index % len(self.batches)]
        image, label = batch["image"].contiguous(memory_format=self.memory_format), batch["label"]
        with autocast("cpu", self.precision):
            logits = self.net(image)
            loss = self.loss_fn(logits, label)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.index += 1
        if self.metrics is not None:
            self.metrics.update(logits.detach().max(1).indices, label)  # as the module does
            if self.index % len(self.batches) == 0:
                self.metrics.compute()
                self.metrics.reset()
        return time.perf_counter() - start


class Interleave(L.Callback):
    """Runs one step of each plain loop before every trainer step and times the trainer in between.

    ``trainer[j]`` is the time from the end of this callback's call before trainer batch ``j`` to its next
    call (or the end of training): trainer step ``j`` with every hook, log and progress-bar update around it,
    and for the last batch of an epoch the epoch-end work (metric compute, checkpoint). ``plain[name][j]`` and
    ``plain[name][j + 1]`` are the plain steps run right before and right after it.
    """

    def __init__(self, loops: dict[str, PlainLoop]) -> None:
        self.loops = loops
        self.plain: dict[str, list[float]] = {name: [] for name in loops}
        self.trainer: list[float] = []
        self._end: float | None = None

    def _between(self) -> None:
        if self._end is not None:
            self.trainer.append(time.perf_counter() - self._end)
        names = list(self.loops)
        for name in names if len(self.trainer) % 2 == 0 else names[::-1]:
            self.plain[name].append(self.loops[name].step())
        self._end = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._between()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._between()


def step_kinds(
    trainer: Sequence[float], plain: Sequence[float], steps: int, log_every: int
) -> dict[str, dict[str, float]]:
    """Per-step trainer/plain ratios by kind of step: the epochs' last steps (epoch-end work), the steps that
    write the loggers (every ``log_every`` steps), and the other steps."""
    kinds: dict[str, list[tuple[float, float]]] = {"other": [], "logging": [], "epoch_end": []}
    for j, pair in enumerate(zip(trainer, plain, strict=True)):
        kind = "epoch_end" if j % steps == steps - 1 else "logging" if (j + 1) % log_every == 0 else "other"
        kinds[kind].append(pair)
    return {
        kind: ratio_summary([t for t, _ in pairs], [p for _, p in pairs])
        for kind, pairs in kinds.items()
        if pairs
    }


def make_batches(datamodule: L.LightningDataModule, steps: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` training batches of the datamodule, generated once (images and labels only)."""
    datamodule.setup("fit")
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append({"image": batch["image"].clone(), "label": batch["label"].clone()})
        if len(batches) == steps:
            break
    if len(batches) < steps:
        raise ValueError(f"the datamodule gave {len(batches)} batches, {steps} were asked for")
    return batches


def components(batch: dict[str, torch.Tensor], num_classes: int, reps: int) -> dict[str, Any]:
    """Per-step costs of the pieces the module adds, interleaved, on this benchmark's batch shape (ms).

    ``argmax(1)`` vs ``max(1).indices`` (what ``_step`` uses for the metrics' predictions) on logits of the
    net's output shape, and the metric updates: torchmetrics' ``DiceScore`` (the Dice metric before this
    benchmark), ``MulticlassF1Score`` with global averaging (its replacement in ``unetseg.metrics``, same
    values) and ``MulticlassJaccardIndex``.
    """
    from torchmetrics.segmentation import DiceScore

    from unetseg.metrics import segmentation_metrics

    label = batch["label"]
    logits = torch.randn(label.shape[0], num_classes, *label.shape[1:])
    pred = logits.max(1).indices
    dice_score = DiceScore(
        num_classes=num_classes,
        include_background=True,
        average="none",
        input_format="index",
        aggregation_level="global",
    )
    metrics = segmentation_metrics(num_classes)
    fns = {
        "argmax(1)": lambda: logits.argmax(1),
        "max(1).indices": lambda: logits.max(1).indices,
        "DiceScore.update": lambda: dice_score.update(pred, label),
        "MulticlassF1Score.update": lambda: metrics["dice"].update(pred, label),
        "MulticlassJaccardIndex.update": lambda: metrics["iou"].update(pred, label),
    }
    times = interleave(fns, reps=reps, warmup=2)
    return {name: summary(t)["median_s"] * 1e3 for name, t in times.items()}


def checkpoint_save_ms(trainer: L.Trainer, folder: Path, reps: int) -> float:
    """Median time of ``trainer.save_checkpoint`` (the trainer's CheckpointIO, as at every epoch end), ms."""
    times = []
    for i in range(reps):
        start = time.perf_counter()
        trainer.save_checkpoint(folder / f"probe-{i}.ckpt")
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(
    channels: Sequence[int],
    batch_size: int,
    spatial_size: int,
    steps: int,
    epochs: int,
    precision: str,
    cli_args: Sequence[str],
    workdir: Path,
) -> dict[str, Any]:
    """Build the trainer through the CLI, fit ``epochs + 1`` epochs (the first is warm-up), return figures."""
    from unetseg.training.callbacks import Performance
    from unetseg.training.cli import _close, build_cli

    args = [
        "--trainer.default_root_dir", str(workdir),
        "--logging.save_dir", str(workdir / "runs"),
        "--trainer.max_epochs", str(epochs + 1),
        "--trainer.precision", precision,
        "--model.net.init_args.channels", str(list(channels)),
        "--data.batch_size", str(batch_size),
        "--data.spatial_size", str(spatial_size),
        "--data.num_train", str(steps * batch_size),
        "--data.num_workers", "0",
        *cli_args,
    ]  # fmt: skip
    cli = build_cli(args)
    trainer, module = cli.trainer, cli.model
    batches = make_batches(cli.datamodule, steps)
    total = steps * (epochs + 1)
    layouts = [c.layout(module.net) for c in trainer.callbacks if isinstance(c, Performance)]
    layout = layouts[0] if layouts else torch.contiguous_format
    same = {"precision": precision, "total": total, "memory_format": layout}
    loops = {
        "plain": PlainLoop(module, batches, metrics=False, **same),
        "plain_metrics": PlainLoop(module, batches, metrics=True, **same),
    }
    timer = Interleave(loops)
    trainer.callbacks.insert(0, timer)
    try:
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
        save_ms = checkpoint_save_ms(trainer, workdir / "probe", reps=3)
    finally:
        _close(trainer)
    parts = components(batches[0], module.net.out_channels, reps=5 if steps < 8 else 20)
    n = len(timer.trainer)
    if n != steps * (epochs + 1):
        raise RuntimeError(f"timed {n} trainer steps, expected {steps * (epochs + 1)}")
    timed = range(steps, n)  # epoch 0 is warm-up
    trainer_steps = [timer.trainer[j] for j in timed]
    around = {  # mean of the plain steps right before and right after each trainer step
        name: [(t[j] + t[j + 1]) / 2 for j in timed] for name, t in timer.plain.items()
    }
    epoch_sums = {
        name: [sum(t[e * steps : (e + 1) * steps]) for e in range(epochs)]
        for name, t in {"trainer": trainer_steps, **around}.items()
    }
    last = [trainer_steps[e * steps + steps - 1] for e in range(epochs)]
    inner = [t for j, t in enumerate(trainer_steps) if j % steps != steps - 1] or trainer_steps
    ratio = ratio_summary(epoch_sums["trainer"], epoch_sums["plain"])
    overhead = [
        (t - p) / steps * 1e3 for t, p in zip(epoch_sums["trainer"], epoch_sums["plain"], strict=True)
    ]
    checkpoint = next(Path(workdir, "runs").rglob("last.ckpt"), None)
    return {
        "config": {
            "net": f"UNet channels={list(channels)} (unet_skip.yaml otherwise)",
            "batch_size": batch_size,
            "spatial_size": spatial_size,
            "steps_per_epoch": steps,
            "timed_epochs": epochs,
            "precision": precision,
            "memory_format (both sides)": str(layout),
            "callbacks": [type(c).__name__ for c in trainer.callbacks if c is not timer],
            "loggers": [type(lg).__name__ for lg in trainer.loggers],
            "log_every_n_steps": trainer.log_every_n_steps,
            "extra_cli_args": list(cli_args),
            "checkpoint_mib": round(checkpoint.stat().st_size / 2**20, 2) if checkpoint else None,
        },
        "epoch_times": {name: summary(t) for name, t in epoch_sums.items()},
        "step_times": {
            "trainer": summary(inner),
            **{name: summary([t[j] for j in timed]) for name, t in timer.plain.items()},
        },
        "epoch_end_ms": (statistics.median(last) - statistics.median(inner)) * 1e3,
        "ratios": {
            "trainer_vs_plain": ratio,
            "trainer_vs_plain_metrics": ratio_summary(epoch_sums["trainer"], epoch_sums["plain_metrics"]),
            "plain_metrics_vs_plain": ratio_summary(epoch_sums["plain_metrics"], epoch_sums["plain"]),
            "step_trainer_vs_plain": ratio_summary(trainer_steps, around["plain"]),
            "step_trainer_vs_plain_metrics": ratio_summary(trainer_steps, around["plain_metrics"]),
        },
        "step_kinds_vs_plain": step_kinds(trainer_steps, around["plain"], steps, trainer.log_every_n_steps),
        "overhead_ms_per_step": statistics.median(overhead),
        "components_ms": {**parts, "trainer.save_checkpoint": save_ms},
        "target": {"trainer_vs_plain_max": TARGET_RATIO, "met": ratio["median"] <= TARGET_RATIO},
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="default: the base config's")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (quick 2)")
    parser.add_argument("--size", type=int, default=None, help="image side, default 64 (quick 32)")
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch, default 16 (quick 3)")
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs, default 8 (quick 2)")
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    parser.add_argument(
        "--cli",
        nargs=argparse.REMAINDER,
        default=[],
        help="extra unetseg CLI arguments (trainer side), e.g. --cli --trainer.enable_progress_bar false",
    )
    args = parse(parser, argv)
    if args.device != "cpu":
        raise SystemExit("framework_overhead measures the CPU trainer; --device must be cpu")
    machine = setup(args)
    quick = args.quick
    channels = args.channels or ([4, 8, 16] if quick else [16, 32, 64, 128])
    with tempfile.TemporaryDirectory(prefix="unetseg-bench-") as tmp:
        results = run(
            channels=channels,
            batch_size=args.batch_size or (2 if quick else 16),
            spatial_size=args.size or (32 if quick else 64),
            steps=args.steps or (3 if quick else 16),
            epochs=args.epochs or (2 if quick else 8),
            precision=args.precision,
            cli_args=args.cli,
            workdir=Path(tmp),
        )
    path = write_result(NAME, args, machine, results)
    ratio = results["ratios"]["trainer_vs_plain"]
    print(
        f"trainer/plain time per step: {ratio['median']:.3f} (IQR {ratio['q1']:.3f}-{ratio['q3']:.3f}); "
        f"overhead {results['overhead_ms_per_step']:.1f} ms/step -> {path}",
        file=sys.stderr,
    )
    return results


if __name__ == "__main__":
    main()

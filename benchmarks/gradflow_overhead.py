"""Overhead of the ``GradientFlow`` callback: training-step time with and without it (docs/ablation.md).

    python -m benchmarks.gradflow_overhead               # ~2 min on 2 cores -> results/gradflow_overhead.json
    python -m benchmarks.gradflow_overhead --quick       # seconds (tests/test_benchmarks.py)

Two figures, both for the base config's UNet (channels 16-32-64-128, 4 classes, batch 16 of 96x96 built-in
synthetic images, AdamW):

* **record cost**: one recorded step of the callback alone (gradient norms, copy of the weights before the
  optimizer step, update norms after it), timed by calling its hooks on the real module after a real backward
  pass, against one training step (forward, loss, backward, optimizer step) of the same module;
* **end to end**: CPU time per optimizer step of a plain Lightning ``Trainer.fit`` without the callback and
  with ``every_n_steps`` = 1 and 10, interleaved ``--repeats`` times (order reversed every other round); the
  figure is the median over rounds of the per-round ratio to the run without the callback. CPU time of this
  process (not wall time), so that other processes on a shared machine do not count.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from benchmarks import _common
from unetseg.analysis.gradflow import GradientFlow
from unetseg.data import SegmentationDataModule
from unetseg.nets import UNet
from unetseg.training.module import SegmentationModule

NAME = "gradflow_overhead"
SETTINGS: dict[str, int | None] = {"without": None, "every_1": 1, "every_10": 10}


class _StepTimer(L.Callback):
    """CPU time of this process from the end of the first training batch to the end of the last."""

    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.steps = 0

    def on_train_batch_end(self, *args: Any) -> None:
        now = time.process_time()
        if self.steps == 0:
            self.start = now
        self.end = now
        self.steps += 1


def _module() -> SegmentationModule:
    torch.manual_seed(0)
    return SegmentationModule(UNet(channels=(16, 32, 64, 128), out_channels=4))


def fit_step_time(every: int | None, steps: int, loader: DataLoader) -> tuple[float, int]:
    """CPU seconds per optimizer step of a ``steps``-step fit with ``GradientFlow(every)`` (or without), and
    the number of records the callback made."""
    timer = _StepTimer()
    gradflow = GradientFlow(every_n_steps=every, log=False) if every else None
    callbacks: list[L.Callback] = [timer] + ([gradflow] if gradflow else [])
    with tempfile.TemporaryDirectory() as folder:  # the callback writes its CSV/JSON/PNG at the end of fit
        trainer = L.Trainer(
            max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks,
            accelerator="cpu", devices=1, default_root_dir=folder,
        )  # fmt: skip
        trainer.fit(_module(), train_dataloaders=loader)
    return (timer.end - timer.start) / (timer.steps - 1), len(gradflow.records) if gradflow else 0


def record_cost(batch: dict[str, torch.Tensor], reps: int) -> dict[str, Any]:
    """Seconds of one recorded step of the callback's hooks vs one training step, interleaved."""
    module = _module()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    callback = GradientFlow(every_n_steps=1, log=False)
    trainer = SimpleNamespace(global_step=0, current_epoch=0, loggers=[])
    callback.on_fit_start(trainer, module)  # type: ignore[arg-type]

    def train_step() -> None:
        optimizer.zero_grad()
        loss = module.loss_fn(module(batch["image"]), batch["label"])
        loss.backward()
        optimizer.step()

    def record() -> None:  # the gradients of the last train_step are still there
        callback.on_before_optimizer_step(trainer, module, optimizer)  # type: ignore[arg-type]
        callback.on_train_batch_end(trainer, module, None, batch, 0)  # type: ignore[arg-type]

    times = _common.interleave({"train_step": train_step, "record": record}, reps=reps)
    groups = len(callback._groups)
    return {
        "groups": groups,
        "records_per_call": len(callback.records) // (reps + 1),
        "train_step": _common.summary(times["train_step"]),
        "record": _common.summary(times["record"]),
        "ratio": _common.ratio_summary(times["record"], times["train_step"]),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = _common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per fit (default 20; 3 quick)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5; 1 quick)")
    args = _common.parse(parser, argv)
    if args.device != "cpu":
        raise SystemExit(f"--device {args.device}: this benchmark measures CPU time; use --device cpu")
    machine = _common.setup(args)
    steps = args.steps or (3 if args.quick else 20)
    repeats = args.repeats or (1 if args.quick else 5)
    batch_size = 4 if args.quick else 16
    data = SegmentationDataModule(num_train=steps * batch_size, num_val=1, num_test=1, batch_size=batch_size)
    data.setup("fit")
    loader = data.train_dataloader()
    batch = next(iter(loader))

    per_step: dict[str, list[float]] = {name: [] for name in SETTINGS}
    records: dict[str, int] = {}
    for rep in range(repeats):
        order = list(SETTINGS.items())
        for name, every in order if rep % 2 == 0 else order[::-1]:
            seconds, records[name] = fit_step_time(every, steps, loader)
            per_step[name].append(seconds)
    end_to_end = {
        name: {
            "records_per_fit": records[name],
            "cpu_s_per_step": _common.summary(values),
            "ratio_vs_without": _common.ratio_summary(values, per_step["without"]),
        }
        for name, values in per_step.items()
    }
    results = {
        "batch_size": batch_size,
        "steps": steps,
        "repeats": repeats,
        "record_cost": record_cost(batch, reps=3 if args.quick else 20),
        "end_to_end": end_to_end,
    }
    path = _common.write_result(NAME, args, machine, results)
    cost = results["record_cost"]
    print(
        f"record: {1000 * cost['record']['median_s']:.2f} ms, training step "
        f"{1000 * cost['train_step']['median_s']:.1f} ms (ratio {cost['ratio']['median']:.4f})"
    )
    for name, entry in end_to_end.items():
        print(
            f"{name:>9}: {1000 * entry['cpu_s_per_step']['median_s']:7.1f} ms CPU/step, ratio "
            f"{entry['ratio_vs_without']['median']:.3f} [{entry['ratio_vs_without']['q1']:.3f}, "
            f"{entry['ratio_vs_without']['q3']:.3f}]"
        )
    print(f"-> {path}")
    return results


if __name__ == "__main__":
    main()

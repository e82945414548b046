"""Training-step speed through the Lightning Trainer: fp32 vs bf16-mixed (and 16-mixed on GPU), contiguous vs
channels_last, with and without torch.compile, for the base config's UNet.

    python benchmarks/precision.py --quick            # 96x96 (the base config's size), ~1 min on 2 CPU cores
    python benchmarks/precision.py --compile          # 256x256 plus compiled variants (many minutes on CPU)

Each variant is a real ``Trainer.fit`` of ``SegmentationModule`` with
``unetseg.training.callbacks.Performance`` on the
built-in synthetic data; a callback times every training step (forward, loss, backward, optimizer step; the
batch is already loaded), the first ``--warmup`` steps are dropped (oneDNN/cuDNN autotuning, compilation).
Shared machines are noisy, so variants run interleaved in ``--repeats`` rounds (order reversed every other
round); a fit's time is its fastest timed step (the least disturbed by other processes, as ``timeit`` does)
and the speed-up is the median over rounds of the per-round ratio against fp32/contiguous.
Results go to ``benchmarks/results/precision[-quick].json``. Imports only ``unetseg`` and
``benchmarks._common``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import cpu_model  # noqa: E402
from unetseg.data import SegmentationDataModule  # noqa: E402
from unetseg.nets import UNet  # noqa: E402
from unetseg.training.callbacks import Performance  # noqa: E402
from unetseg.training.module import SegmentationModule  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


class StepTimer(Callback):
    """Wall time of every training step (synchronised on GPU)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._sync(trainer)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._sync(trainer)
        self.times.append(time.perf_counter() - self._start)


def base_net_args() -> dict[str, Any]:
    """The UNet arguments of ``configs/unet_skip.yaml``."""
    config = yaml.safe_load((REPO / "configs" / "unet_skip.yaml").read_text())
    return dict(config["model"]["net"]["init_args"])


def step_time(variant: dict[str, Any], args: argparse.Namespace, accelerator: str) -> float:
    """Fastest timed training step (s) of one short fit of ``variant``."""
    torch.manual_seed(0)
    data = SegmentationDataModule(
        spatial_dims=2, spatial_size=args.size, batch_size=args.batch_size,
        num_train=args.batch_size * (args.warmup + args.steps), num_val=1, num_test=1,
    )
    net = UNet(spatial_dims=2, in_channels=data.in_channels, out_channels=data.num_classes, **base_net_args())
    module = SegmentationModule(net, class_names=data.class_names)
    timer = StepTimer()
    performance = Performance(variant["memory_format"], compile=variant["compile"])
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision=variant["precision"], max_epochs=1,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[performance, timer],
    )
    trainer.fit(module, datamodule=data)
    return min(timer.times[args.warmup:])


def variants(accelerator: str, compile: bool) -> list[dict[str, Any]]:
    precisions = ["32", "bf16-mixed"] + (["16-mixed"] if accelerator == "gpu" else [])
    out = [
        {"precision": p, "memory_format": m, "compile": False}
        for p in precisions
        for m in ("contiguous", "channels_last")
    ]
    if compile:
        out += [{"precision": p, "memory_format": "channels_last", "compile": True} for p in precisions]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="96x96, few steps")
    parser.add_argument("--size", type=int, default=None, help="image size (default 256; 96 with --quick)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=None, help="steps dropped (default 3; 6 with compile)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per fit (default 8; 5 quick)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 5; 3 with --compile)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile (inductor) variants")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.size = args.size or (96 if args.quick else 256)
    args.steps = args.steps or (4 if args.quick else 6)
    args.warmup = args.warmup or (6 if args.compile else 2)
    args.repeats = args.repeats or (3 if args.compile else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    todo = variants(accelerator, args.compile)
    names = [f"{v['precision']}/{v['memory_format']}{'/compile' if v['compile'] else ''}" for v in todo]

    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.repeats):
        order = list(zip(names, todo, strict=True))
        for name, variant in order if rep % 2 == 0 else order[::-1]:
            times[name].append(step_time(variant, args, accelerator))
            ms = times[name][-1] * 1000
            print(f"round {rep + 1}/{args.repeats} {name:36s} {ms:8.1f} ms/step", flush=True)

    baseline = times[names[0]]
    results = []
    for name, variant in zip(names, todo, strict=True):
        median = statistics.median(times[name])
        speedups = [b / t for b, t in zip(baseline, times[name], strict=True)]
        results.append(
            {
                **variant, "step_s": round(median, 5),
                "images_per_s": round(args.batch_size / median, 2),
                "speedup_vs_fp32": round(statistics.median(speedups), 3),
            }
        )
    report = {
        "benchmark": "training step through lightning.Trainer, base-config UNet "
        f"{base_net_args()['channels']}, {base_net_args()['long_skip']} skips",
        "device": torch.cuda.get_device_name() if accelerator == "gpu" else cpu_model(),
        "cpu_count": os.cpu_count(), "cpu_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "torch": torch.__version__, "lightning": L.__version__,
        "image_size": args.size, "batch_size": args.batch_size, "warmup_steps": args.warmup,
        "timed_steps": args.steps, "repeats": args.repeats, "step_time": "fastest timed step of a fit",
        "results": results,
    }
    suffix = ("-quick" if args.quick else "") + ("-gpu" if accelerator == "gpu" else "")
    out = args.out or RESULTS / f"precision{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'variant':36s} {'ms/step':>9s} {'img/s':>8s} {'vs fp32':>8s}")
    for name, r in zip(names, results, strict=True):
        ms, speed, gain = r["step_s"] * 1000, r["images_per_s"], r["speedup_vs_fp32"]
        print(f"{name:36s} {ms:9.1f} {speed:8.1f} {gain:7.2f}x")
    print(f"-> {out}")
    return report


if __name__ == "__main__":
    main()

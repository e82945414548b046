"""The plain MONAI training loop a user would write: the baseline that unetseg is compared against.

Reads an MSD dataset with nibabel (``dataset.json`` + a split file ``{"train", "val", "test"}`` of case ids,
e.g. the one :mod:`benchmarks.real_mri` writes), never through ``unetseg``:

* data: every training volume in memory, z-scored per volume (mean / std over the whole volume), padded
  in-plane with zeros (the raw background of a skull-stripped MRI, padded before normalising, with the
  volume's own mean / std) to a multiple of 16; batches of 8 random axial (last-axis) slices drawn uniformly
  over all training slices, each flipped at random along X and along Y;
* model: MONAI ``BasicUNet(spatial_dims=2, in_channels=1, out_channels=C,
  features=(16, 16, 32, 64, 128, 16))``;
  loss ``DiceCELoss(to_onehot_y=True, softmax=True)`` (MONAI defaults otherwise: per image, background
  included), computed in float32 on the logits; Adam, lr 1e-3; bf16 autocast and channels_last on CPU;
* stop after ``seconds`` of training (wall time) or ``steps`` steps, whichever comes first;
* test: each test case slice by slice (whole slices, padded to a multiple of 16 and cropped back), global Dice
  per foreground class: TP / FP / FN summed over the whole test set, ``Dice = 2 TP / (2 TP + FP + FN)``
  (``nan`` for a class absent from both labels and predictions). The validation split is not used.

Seeded (torch, numpy); deterministic for a given ``steps`` and thread count.

    python -m benchmarks.reference_loop --root /tmp/real_mri --seconds 180 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet

MULTIPLE = 16
BATCH = 8


def read_cases(root: Path, split_file: Path) -> tuple[list[str], dict[str, list[tuple[Path, Path]]]]:
    """Class names and ``{split: [(image, label), ...]}`` from ``dataset.json`` and the split file."""
    data = json.loads((root / "dataset.json").read_text())
    names = [name for _, name in sorted((int(k), v) for k, v in data["labels"].items())]
    by_id = {
        Path(e["image"]).name.removesuffix(".nii.gz"): (root / e["image"], root / e["label"])
        for e in data["training"]
    }
    split = json.loads(split_file.read_text())
    split = split[0] if isinstance(split, list) else split  # nnU-Net splits_final.json: fold 0
    return names, {key: [by_id[i] for i in split.get(key, [])] for key in ("train", "val", "test")}


def load_volume(image: Path, label: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Z-scored image and label ``(X', Y', Z)`` padded in-plane to multiples of 16; original ``(X, Y)``."""
    x = np.asarray(nib.load(image).dataobj, dtype=np.float32)
    y = np.asarray(nib.load(label).dataobj).astype(np.int64)
    mean, std = float(x.mean()), float(x.std())
    pad = [(0, -s % MULTIPLE) for s in x.shape[:2]] + [(0, 0)]
    x = (np.pad(x, pad) - mean) / max(std, 1e-8)
    return x.astype(np.float32), np.pad(y, pad), (y.shape[0], y.shape[1])


def run_reference(
    root: str | Path,
    split_file: str | Path | None = None,
    seconds: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    net: Callable[[int], torch.nn.Module] | None = None,
    loss: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Train for ``seconds`` (wall time) or ``steps`` steps, test, return Dice per class and timings.

    ``net`` (a function of the class count) and ``loss`` replace BasicUNet and DiceCELoss, for experiments
    that change one part of the loop (``benchmarks.loss_choice``)."""
    if seconds is None and steps is None:
        raise ValueError("give seconds or steps (or both: the first reached stops training)")
    start = time.perf_counter()
    root = Path(root)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    names, cases = read_cases(root, Path(split_file) if split_file else root / "splits.json")
    train = [load_volume(*c) for c in cases["train"]]
    if not train or not cases["test"]:
        raise ValueError(f"{root}: the split needs training and test cases")
    index = [(v, z) for v, (x, _, _) in enumerate(train) for z in range(x.shape[2])]
    if net is None:
        model = BasicUNet(
            spatial_dims=2, in_channels=1, out_channels=len(names), features=(16, 16, 32, 64, 128, 16)
        )
    else:
        model = net(len(names))
    model = model.to(memory_format=torch.channels_last)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True) if loss is None else loss
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    model.train()
    step, loss_value, t0 = 0, math.nan, time.perf_counter()
    while (steps is None or step < steps) and (seconds is None or time.perf_counter() - t0 < seconds):
        xs, ys = [], []
        for i in rng.integers(len(index), size=BATCH):
            v, z = index[i]
            x, y = train[v][0][:, :, z], train[v][1][:, :, z]
            for axis in (0, 1):
                if rng.random() < 0.5:
                    x, y = np.flip(x, axis), np.flip(y, axis)
            xs.append(x.copy())
            ys.append(y.copy())
        images = torch.from_numpy(np.stack(xs))[:, None].contiguous(memory_format=torch.channels_last)
        labels = torch.from_numpy(np.stack(ys))[:, None]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(images)
        loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        loss_value = loss.item()
    train_seconds = time.perf_counter() - t0

    model.eval()
    tp, fp, fn = (np.zeros(len(names), dtype=np.int64) for _ in range(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for image, label in cases["test"]:
            x, y, (sx, sy) = load_volume(image, label)
            batch = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[
                :, None
            ]  # slices (Z, 1, X, Y)
            pred = model(batch.contiguous(memory_format=torch.channels_last)).float().argmax(1).numpy()
            pred, truth = pred[:, :sx, :sy], y.transpose(2, 0, 1)[:, :sx, :sy]
            for c in range(1, len(names)):
                p, t = pred == c, truth == c
                tp[c] += int((p & t).sum())
                fp[c] += int((p & ~t).sum())
                fn[c] += int((~p & t).sum())
    dice = {
        names[c]: (2 * tp[c] / d if (d := 2 * tp[c] + fp[c] + fn[c]) else math.nan)
        for c in range(1, len(names))
    }
    finite = [v for v in dice.values() if not math.isnan(v)]
    return {
        "dice": {k: float(v) for k, v in dice.items()},
        "mean_dice": float(np.mean(finite)) if finite else math.nan,
        "steps": step,
        "final_loss": loss_value,
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - start, 2),
        "seconds_per_step": round(train_seconds / step, 4) if step else None,
        "cases": {k: len(v) for k, v in cases.items()},
        "train_slices": len(index),
        "seed": seed,
        "threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else [],
        "root": str(root),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: run the reference loop and print its result as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.reference_loop", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--root", type=Path, required=True, help="MSD dataset folder")
    parser.add_argument("--split-file", type=Path, default=None, help="default ROOT/splits.json")
    parser.add_argument("--seconds", type=float, default=None, help="training wall-time budget")
    parser.add_argument("--steps", type=int, default=None, help="number of training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)
    if args.seconds is None and args.steps is None:
        parser.error("give --seconds and/or --steps")
    result = run_reference(args.root, args.split_file, args.seconds, args.steps, args.seed, args.threads)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which Dice formulation learns every class of the real-MRI benchmark, the rare one included?

The plain reference loop (:mod:`benchmarks.reference_loop`: random slices, flips, Adam 1e-3, bf16) with
unetseg's ``UNet`` (default channels 16-128, batch norm) and MONAI's ``DiceCELoss`` in five forms: Dice per
image or over the batch, background in or out, smoothing 1e-5 or 1. Same steps and seeds for each; test Dice
per class (global over the test set).

    python -m benchmarks.loss_choice --root /tmp/real_mri --steps 400 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from monai.losses import DiceCELoss

from benchmarks.reference_loop import run_reference
from unetseg.nets import UNet

VARIANTS: dict[str, dict[str, Any]] = {
    "per-image, background in (MONAI default)": {"batch": False, "include_background": True},
    "per-image, background out": {"batch": False, "include_background": False},
    "batch, background in": {"batch": True, "include_background": True},
    "batch, background out (unetseg)": {"batch": True, "include_background": False},
    "batch, background out, smooth 1": {
        "batch": True,
        "include_background": False,
        "smooth_nr": 1.0,
        "smooth_dr": 1.0,
    },
}


def run(root: Path, steps: int, seeds: list[int], threads: int | None) -> list[dict[str, Any]]:
    """One reference-loop run per variant and seed; rows of variant, seed, mean and per-class Dice."""
    rows = []
    for seed in seeds:
        for name, kwargs in VARIANTS.items():
            result = run_reference(
                root,
                steps=steps,
                seed=seed,
                threads=threads,
                net=lambda k: UNet(in_channels=1, out_channels=k),
                loss=DiceCELoss(to_onehot_y=True, softmax=True, **kwargs),
            )
            rows.append({"variant": name, "seed": seed, "mean_dice": result["mean_dice"], **result["dice"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """CLI: run every variant and print one JSON line per run."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loss_choice", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write all rows as JSON here")
    args = parser.parse_args(argv)
    rows = run(args.root, args.steps, args.seeds, args.threads)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

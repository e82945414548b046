"""``python -m unetseg.plan --data.root DIR [--data.split_file F] [--output plan.yaml] [--gpu auto]``.

Fingerprints the dataset, plans its training and writes the plan as a YAML overlay (reasons as comments),
then prints it. Train with it: ``python train.py --config plan.yaml --data.root DIR``, or plan and train in
one step: ``python train.py --config auto --data.root DIR``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from unetseg.data.formats.validate import DatasetError
from unetseg.plan.overlay import plan_dataset

GPU_CHOICES = {"auto": None, "yes": True, "no": False}


def main(argv: Sequence[str] | None = None) -> int:
    """Plan the dataset named by ``--data.root``; exit 2 with one line for a bad dataset."""
    parser = argparse.ArgumentParser(prog="python -m unetseg.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data.root", dest="root", required=True, help="dataset folder (MSD, nnU-Net, 2D)")
    parser.add_argument("--data.split_file", dest="split_file", default=None, help="plan from its train+val")
    parser.add_argument("--output", "-o", default="plan.yaml", help="where to write the overlay")
    parser.add_argument(
        "--gpu",
        choices=sorted(GPU_CHOICES),
        default="auto",
        help="plan for a machine with a GPU (auto: this machine)",
    )
    args = parser.parse_args(argv)
    try:
        path = plan_dataset(args.root, args.output, args.split_file, GPU_CHOICES[args.gpu])
    except (DatasetError, ValueError, FileNotFoundError) as err:
        print(f"unetseg.plan: error: {err}", file=sys.stderr)
        return 2
    print(path.read_text(), end="")
    print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

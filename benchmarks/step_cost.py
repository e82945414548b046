"""Training-step cost of the CPU plan's net widths against the reference loop's MONAI ``BasicUNet``.

One full step (forward under bf16 autocast, cross-entropy in float32, backward, Adam) on a random batch of
``--size`` slices, channels-last, per net and batch size: milliseconds per step and per slice (median of the
per-step times after ``--warmup`` steps). The figures behind the plan's CPU widths (docs/planning.md).

    python -m benchmarks.step_cost                       # 75x93 slices padded to 80x96, batches 8 and 11
    python -m benchmarks.step_cost --steps 2 --warmup 1 --size 32 32 --batches 2   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from monai.networks.nets import BasicUNet
from torch import nn

from unetseg import UNet

WIDTHS = ((16, 32, 64, 128, 128), (16, 32, 64, 128), (16, 16, 32, 64, 128), (8, 16, 32, 64, 128))


def step_ms(
    net: nn.Module, batch: int, size: Sequence[int], steps: int, warmup: int, classes: int = 5
) -> float:
    """Median milliseconds of one training step of ``net`` on ``batch`` random slices of ``size``."""
    net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    image = torch.randn(batch, 1, *size).contiguous(memory_format=torch.channels_last)
    label = torch.randint(0, classes, (batch, *size))
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(image)
        loss = nn.functional.cross_entropy(logits.float(), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[warmup:])


def rows(size: Sequence[int], batches: Sequence[int], steps: int, warmup: int) -> list[dict]:
    """One row per (net, batch): the reference ``BasicUNet`` at batch 8 first, then each unetseg width."""
    torch.manual_seed(0)
    out = []
    ref = BasicUNet(spatial_dims=2, in_channels=1, out_channels=5, features=(16, 16, 32, 64, 128, 16))
    ms = step_ms(ref, 8, size, steps, warmup)
    out.append({"net": "BasicUNet (16, 16, 32, 64, 128)", "batch": 8, "ms_step": ms, "ms_slice": ms / 8})
    for widths in WIDTHS:
        for batch in batches:
            ms = step_ms(UNet(2, 1, 5, channels=widths), batch, size, steps, warmup)
            out.append({"net": f"UNet {widths}", "batch": batch, "ms_step": ms, "ms_slice": ms / batch})
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: the markdown table of :func:`rows`."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.step_cost", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--size", type=int, nargs=2, default=[80, 96])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 11])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    print("| net | batch | ms / step | ms / slice |\n|---|---|---|---|")
    for row in rows(args.size, args.batches, args.steps, args.warmup):
        print(f"| {row['net']} | {row['batch']} | {row['ms_step']:.1f} | {row['ms_slice']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

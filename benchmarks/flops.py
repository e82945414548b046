"""Precision and memory layout in a plain PyTorch training step; achieved FLOP/s against the measured peak.

The variants train the same UNet (``channels=(16, 32, 64, 128, 256)``, 4 classes) on the same random batch,
interleaved in every repetition: a step is forward, ``dice_ce`` loss, backward and an AdamW step.

* ``fp32``: float32 everywhere;
* ``bf16``: bf16 autocast (Lightning's ``precision="bf16-mixed"``);
* ``bf16_cl``: bf16 autocast with the net and the batch in ``torch.channels_last``;
* ``bf16_cl_compile``: the same with ``torch.compile(net)`` (compile time reported separately).

The peak is measured on the same machine, in the same process: a 3x3 conv 256 -> 256 channels at 128x128
(forward + backward, contiguous and channels_last, the faster counts) in bf16 and in fp32. Achieved FLOP/s of
a variant = the step's conv/matmul FLOPs (``FlopCounterMode``; norms, activations and the optimizer do no
conv/matmul FLOPs but take time) / its median step time; the fraction is against the peak of its dtype.
The Trainer-level precision comparison (``precision=`` through ``unetseg``) is ``benchmarks/precision.py``.

    python -m benchmarks.flops                  # full: CPU, batch 8 at 128x128, ~3 min (compile: 1-2 min)
    python -m benchmarks.flops --quick          # smoke run (no compile), seconds
    python -m benchmarks.flops --device cuda    # GPU: images/s at 256x256 and 512x512 -> flops_cuda.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from benchmarks._common import (
    base_parser,
    count_flops,
    interleave,
    parse,
    ratio_summary,
    setup,
    summary,
    synchronize,
    write_result,
)

NAME = "flops"
NUM_CLASSES = 4
VARIANTS = ("fp32", "bf16", "bf16_cl", "bf16_cl_compile")
# The plain-PyTorch measurement quoted in issue 7 (16-256-channel UNet, 128x128, batch 8, this CPU type).
ISSUE_REFERENCE_MS = {"fp32": 250.0, "bf16": 151.0, "bf16_cl": 107.0, "bf16_cl_compile": 90.0}


class TrainStep:
    """A training step of one variant: its own copy of the net and optimizer, its own input layout."""

    def __init__(self, net: nn.Module, image: torch.Tensor, label: torch.Tensor, variant: str) -> None:
        from unetseg.losses import SegmentationLoss

        self.bf16 = variant != "fp32"
        channels_last = variant.startswith("bf16_cl")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.net = copy.deepcopy(net).to(memory_format=fmt)
        self.model: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(self.net) if variant.endswith("compile") else self.net
        )
        self.image = image.contiguous(memory_format=fmt)
        self.label = label
        self.loss_fn = SegmentationLoss("dice_ce")
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=1e-4)
        self.device_type = image.device.type

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss_fn(self.model(self.image), self.label)
        loss.backward()
        self.optimizer.step()


def conv_peak(batch: int, size: int, channels: int, reps: int, device: str) -> dict[str, dict[str, Any]]:
    """GFLOP/s of a 3x3 conv ``channels -> channels`` forward + backward, per dtype and layout."""
    out: dict[str, dict[str, Any]] = {}
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        fns = {}
        for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False, device=device, dtype=dtype)
            conv = conv.to(memory_format=fmt)
            x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
            x = x.contiguous(memory_format=fmt).requires_grad_(True)

            def fwd_bwd(conv: nn.Module = conv, x: torch.Tensor = x) -> None:
                conv.zero_grad(set_to_none=True)
                x.grad = None
                conv(x).sum().backward()

            fns[layout] = fwd_bwd
        gflop = count_flops(fns["contiguous"]) / 1e9
        times = interleave(fns, reps=reps, warmup=1, device=device)
        layouts = {
            layout: {**summary(t), "gflop_per_s": gflop / summary(t)["median_s"]}
            for layout, t in times.items()
        }
        best = max(layouts, key=lambda k: layouts[k]["gflop_per_s"])
        out[dtype_name] = {
            "gflop_per_step": gflop,
            "layouts": layouts,
            "best_layout": best,
            "gflop_per_s": layouts[best]["gflop_per_s"],
        }
    return out


def measure_size(
    batch: int, size: int, channels: Sequence[int], variants: Sequence[str], reps: int, device: str
) -> dict[str, Any]:
    """Step time, images/s and achieved GFLOP/s of each variant at one image size."""
    from unetseg import UNet

    torch.manual_seed(0)
    net = UNet(2, 1, NUM_CLASSES, channels=tuple(channels)).to(device).train()
    image = torch.randn(batch, 1, size, size, device=device)
    label = torch.randint(0, NUM_CLASSES, (batch, size, size), device=device)
    steps = {v: TrainStep(net, image, label, v) for v in variants}
    gflop = count_flops(TrainStep(net, image, label, "fp32")) / 1e9
    compile_s: dict[str, float] = {}
    for name, step in steps.items():  # first call (compilation for the compiled variant)
        start = time.perf_counter()
        step()
        synchronize(device)
        compile_s[name] = time.perf_counter() - start
    times = interleave(steps, reps=reps, warmup=1, device=device)
    out: dict[str, Any] = {
        "batch": batch,
        "size": [size, size],
        "gflop_per_step": gflop,
        "variants": {},
        "ratios_vs_fp32": {},
    }
    for name, t in times.items():
        stats = summary(t)
        out["variants"][name] = {
            **stats,
            "images_per_s": batch / stats["median_s"],
            "gflop_per_s": gflop / stats["median_s"],
            "first_call_s": compile_s[name],
        }
        if name != "fp32" and "fp32" in times:
            out["ratios_vs_fp32"][name] = ratio_summary(t, times["fp32"])
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (quick 2)")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="image sides, default 128 on CPU, 256 512 on GPU"
    )
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions, default 8 (quick 2)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="include the torch.compile variant (default: yes, except with --quick; compiling takes 1-2 min)",
    )
    parser.add_argument("--peak-batch", type=int, default=None, help="batch of the peak conv, default 2")
    args = parse(parser, argv)
    machine = setup(args)
    quick, device = args.quick, args.device
    gpu = torch.device(device).type == "cuda"
    channels = (4, 8, 16) if quick else (16, 32, 64, 128, 256)
    batch = args.batch_size or (2 if quick else 8)
    sizes = args.sizes or ([32] if quick else [256, 512] if gpu else [128])
    reps = args.reps or (2 if quick else 8)
    compile_ = not quick if args.compile is None else args.compile
    variants = [v for v in VARIANTS if compile_ or not v.endswith("compile")]
    peak_size, peak_channels = (16, 32) if quick else (128, 256)
    peak_batch = args.peak_batch or (1 if quick else 8 if gpu else 2)
    peak = conv_peak(peak_batch, peak_size, peak_channels, reps=2 if quick else 3, device=device)
    per_size = {}
    for size in sizes:
        res = measure_size(batch, size, channels, variants, reps, device)
        for name, v in res["variants"].items():
            dtype = "fp32" if name == "fp32" else "bf16"
            v["fraction_of_peak"] = v["gflop_per_s"] / peak[dtype]["gflop_per_s"]
            v["fraction_of_bf16_peak"] = v["gflop_per_s"] / peak["bf16"]["gflop_per_s"]
        per_size[str(size)] = res
    results = {
        "model": f"unetseg UNet(channels={channels}), 1 -> {NUM_CLASSES} channels",
        "step": "forward + dice_ce loss + backward + AdamW step",
        "variants": variants,
        "peak": {
            "conv": f"3x3 conv {peak_channels}->{peak_channels}, {peak_size}x{peak_size}, "
            f"batch {peak_batch}, forward + backward",
            **peak,
        },
        "sizes": per_size,
        "issue_reference_ms": ISSUE_REFERENCE_MS if not gpu else {},
    }
    path = write_result(NAME, args, machine, results, stem=NAME if not gpu else f"{NAME}_cuda")
    for size, res in per_size.items():
        line = ", ".join(
            f"{k} {v['median_s'] * 1e3:.0f} ms ({v['fraction_of_peak']:.0%} of peak)"
            for k, v in res["variants"].items()
        )
        print(f"{size}x{size}: {line} -> {path}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()

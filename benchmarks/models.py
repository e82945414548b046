"""Model efficiency: unetseg's ``UNet`` vs MONAI's ``BasicUNet``/``UNet`` and smp's ``Unet``; skip modes.

Each model runs a training step without the optimizer (forward, ``dice_ce`` loss, backward) on the same
random batch, in fp32 and under bf16 autocast; all models of a table are interleaved in every repetition.
Reported per model: parameters, FLOPs of the step (convolutions and matmuls, counted by ``FlopCounterMode``),
the median step time, achieved GFLOP/s, and per-repetition ratios against the reference model of the table:
time and time per FLOP (a model doing more work may take longer; time/FLOP compares how efficiently it runs).

The "matched" pair is ``UNet(channels=(32, 32, 64, 128, 256))`` and MONAI's default ``BasicUNet`` features
``(32, 32, 64, 128, 256, 32)``: same levels, 2x2 transposed-conv upsampling, concatenating skips and two 3x3
convs per level; MONAI's is set to batch norm, ReLU and no conv bias like unetseg's (the parameter counts are
then equal). MONAI's defaults (instance norm, LeakyReLU, biased convs) are compared with
``UNet(norm="instance")``. MONAI ``UNet`` (strided convs, residual units) and smp ``Unet`` (ResNet-18 encoder)
differ in design; compare them by time per FLOP.

    python -m benchmarks.models            # full: batch 4 at 64x64, 10 repetitions, ~3 min
    python -m benchmarks.models --quick    # smoke run, seconds
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from benchmarks._common import (
    autocast,
    base_parser,
    count_flops,
    interleave,
    parse,
    ratio_summary,
    setup,
    summary,
    write_result,
)

NAME = "models"
PRECISIONS = ("32", "bf16-mixed")
NUM_CLASSES = 4


def smp_unet(in_channels: int, out_channels: int) -> nn.Module:
    """smp ``Unet`` with a randomly initialised ResNet-18 encoder (raises when smp cannot be imported)."""
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet18", encoder_weights=None, in_channels=in_channels, classes=out_channels)


def smp_status() -> str:
    """``"available"`` or ``"unavailable: <reason>"`` for segmentation_models_pytorch."""
    try:
        import segmentation_models_pytorch  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure (missing torchvision, CUDA-only wheel)
        return f"unavailable: {type(err).__name__}: {err}".splitlines()[0]
    return "available"


def model_table(features: Sequence[int], with_smp: bool) -> dict[str, tuple[str, Callable[[], nn.Module]]]:
    """Name -> (description, constructor) for the framework comparison; ``features`` has 5 levels."""
    from monai.networks.nets import BasicUNet
    from monai.networks.nets import UNet as MonaiUNet

    from unetseg import UNet

    f = tuple(features)
    table: dict[str, tuple[str, Callable[[], nn.Module]]] = {
        "unetseg": (
            f"unetseg UNet(channels={f}, norm='batch')",
            lambda: UNet(2, 1, NUM_CLASSES, channels=f, norm="batch"),
        ),
        "monai_basicunet": (
            f"MONAI BasicUNet(features={(*f, f[0])}, norm='batch', act='relu', bias=False)",
            lambda: BasicUNet(2, 1, NUM_CLASSES, features=(*f, f[0]), norm="batch", act="relu", bias=False),
        ),
        "unetseg_instance": (
            f"unetseg UNet(channels={f}, norm='instance')",
            lambda: UNet(2, 1, NUM_CLASSES, channels=f, norm="instance"),
        ),
        "monai_basicunet_default": (
            f"MONAI BasicUNet(features={(*f, f[0])}) defaults: instance norm, LeakyReLU, bias",
            lambda: BasicUNet(2, 1, NUM_CLASSES, features=(*f, f[0])),
        ),
        "monai_unet": (
            f"MONAI UNet(channels={f}, strides=(2, 2, 2, 2), num_res_units=2, norm='batch')",
            lambda: MonaiUNet(
                2, 1, NUM_CLASSES, channels=f, strides=(2, 2, 2, 2), num_res_units=2, norm="batch"
            ),
        ),
    }
    if with_smp:
        table["smp_unet"] = (
            "smp Unet('resnet18', encoder_weights=None), decoder_channels (256, 128, 64, 32, 16)",
            lambda: smp_unet(1, NUM_CLASSES),
        )
    return table


def skip_table(channels: Sequence[int]) -> dict[str, tuple[str, Callable[[], nn.Module]]]:
    """unetseg UNet with each long-skip mode, plain and residual blocks."""
    from unetseg import UNet

    c = tuple(channels)
    table: dict[str, tuple[str, Callable[[], nn.Module]]] = {}
    for residual in (False, True):
        for skip in ("concat", "add", "none"):
            name = f"{skip}{'_residual' if residual else ''}"
            table[name] = (
                f"UNet(channels={c}, long_skip='{skip}', block='{'residual' if residual else 'plain'}')",
                lambda skip=skip, residual=residual: UNet(
                    2, 1, NUM_CLASSES, channels=c, long_skip=skip, block="residual" if residual else "plain"
                ),
            )
    return table


def step_fn(
    net: nn.Module, image: torch.Tensor, label: torch.Tensor, precision: str, device: str
) -> Callable[[], None]:
    """Forward, ``dice_ce`` loss and backward of ``net`` (no optimizer step) under ``precision``."""
    from unetseg.losses import SegmentationLoss

    loss_fn = SegmentationLoss("dice_ce")

    def step() -> None:
        net.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = loss_fn(net(image), label)
        loss.backward()

    return step


def compare(
    table: dict[str, tuple[str, Callable[[], nn.Module]]],
    reference: str,
    batch: int,
    size: int,
    reps: int,
    warmup: int,
    device: str,
) -> dict[str, Any]:
    """Params, FLOPs, step times (each precision interleaved over the models) and ratios to ``reference``."""
    torch.manual_seed(0)
    image = torch.randn(batch, 1, size, size, device=device)
    label = torch.randint(0, NUM_CLASSES, (batch, size, size), device=device)
    nets = {}
    for name, (_, build) in table.items():
        torch.manual_seed(0)
        nets[name] = build().to(device).train()
    out: dict[str, Any] = {
        name: {
            "description": table[name][0],
            "params": sum(p.numel() for p in net.parameters()),
            "gflop_per_step": count_flops(step_fn(net, image, label, "32", device)) / 1e9,
        }
        for name, net in nets.items()
    }
    ratios: dict[str, Any] = {}
    raw: dict[str, dict[str, list[float]]] = {}
    for precision in PRECISIONS:
        steps = {name: step_fn(net, image, label, precision, device) for name, net in nets.items()}
        times = raw[precision] = interleave(steps, reps=reps, warmup=warmup, device=device)
        ratios[precision] = {}
        for name, t in times.items():
            stats = summary(t)
            out[name][precision] = {**stats, "gflop_per_s": out[name]["gflop_per_step"] / stats["median_s"]}
            if name == reference:
                continue
            ratios[precision][name] = pair_ratio(out, times, name, reference)
    return {"models": out, "ratios": ratios, "reference": reference, "_times": raw}


def pair_ratio(
    models: dict[str, Any], times: dict[str, list[float]], name: str, reference: str
) -> dict[str, dict[str, float]]:
    """Per-repetition time ratio ``name / reference`` and the same per FLOP (``(t/F) / (t_ref/F_ref)``)."""
    time_ratio = ratio_summary(times[name], times[reference])
    scale = models[reference]["gflop_per_step"] / models[name]["gflop_per_step"]
    return {
        "time": time_ratio,
        "time_per_flop": {k: v * scale if k != "n" else v for k, v in time_ratio.items()},
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default 4 (quick 2: smp's bottleneck is 1x1 at 32x32)"
    )
    parser.add_argument("--size", type=int, default=None, help="image side, default 64 (quick 32)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions, default 10 (quick 2)")
    parser.add_argument(
        "--features", type=int, nargs=5, default=None, help="5 levels, default 32 32 64 128 256"
    )
    args = parse(parser, argv)
    machine = setup(args)
    quick = args.quick
    features = args.features or ([4, 4, 8, 16, 32] if quick else [32, 32, 64, 128, 256])
    batch = args.batch_size or (2 if quick else 4)
    size = args.size or (32 if quick else 64)
    reps = args.reps or (2 if quick else 10)
    warmup = 1 if quick else 2
    smp = smp_status()
    frameworks = compare(
        model_table(features, with_smp=smp == "available"), "unetseg", batch, size, reps, warmup, args.device
    )
    skip_channels = features[1:] if quick else [32, 64, 128, 256]
    skips = compare(skip_table(skip_channels), "concat", batch, size, reps, warmup, args.device)
    # (t_unetseg / F_unetseg) / (t_monai / F_monai) per repetition: unetseg is no slower per FLOP when <= 1.
    # "met" asks that 1 is not below the ratio's interquartile range (no measurable slowdown).
    raw = frameworks.pop("_times")
    skips.pop("_times")
    pairs = {"unetseg_vs_monai_basicunet": ("unetseg", "monai_basicunet")}
    pairs["unetseg_instance_vs_monai_basicunet_default"] = ("unetseg_instance", "monai_basicunet_default")
    target = {
        pair: {p: pair_ratio(frameworks["models"], raw[p], a, b)["time_per_flop"] for p in PRECISIONS}
        for pair, (a, b) in pairs.items()
    }
    results = {
        "input": {"batch": batch, "size": [size, size], "in_channels": 1, "classes": NUM_CLASSES},
        "step": "forward + dice_ce loss + backward (no optimizer step)",
        "smp": smp,
        "frameworks": frameworks,
        "skips": skips,
        "target": {
            "rule": "time per FLOP of unetseg / MONAI BasicUNet (matched config): q1 <= 1",
            "time_per_flop": target,
            "met": all(r["q1"] <= 1.0 for r in target["unetseg_vs_monai_basicunet"].values()),
        },
    }
    path = write_result(NAME, args, machine, results)
    summary_line = {p: round(r["median"], 3) for p, r in target["unetseg_vs_monai_basicunet"].items()}
    print(f"unetseg/MONAI BasicUNet time per FLOP: {summary_line} -> {path}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()

"""Loss landscape around a checkpoint along filter-normalized random directions (Li et al., 2018).

``python -m unetseg.analysis.landscape --ckpt runs/x/version_0/checkpoints/best.ckpt --out landscape/`` draws
the loss ``L(theta* + a d1 + b d2)`` of the checkpoint's weights ``theta*`` on the first ``num_batches``
validation batches: a 1D curve along ``d1`` and a 2D contour over ``(d1, d2)``. Each direction is a Gaussian
random vector (seeded) rescaled filter by filter to the norm of the corresponding filter of ``theta*``
(``d[i] <- d[i] / ||d[i]|| * ||theta*[i]||`` for every slice ``i`` along the first dimension of each weight);
biases and normalisation parameters (1-D tensors) get a zero direction, as in Li et al.'s ``biasbn``
setting. The net is in eval mode (BatchNorm uses its running statistics), so the same checkpoint and seed
give the same numbers. Several ``--ckpt`` (with ``--label``) are drawn side by side in ``comparison.png``
with shared contour levels, e.g. a skip and a no-skip model.

The model and data are rebuilt from the run's ``config.yaml`` (written by the training CLI next to
``checkpoints/``) unless ``--config`` is given. Outputs per checkpoint: ``landscape.npz`` (all arrays),
``landscape_1d.csv`` (alpha, loss), ``landscape_2d.csv`` (alpha, beta, loss), ``landscape_1d.png``,
``landscape_2d.png``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unetseg.analysis.plotting import pyplot, save_figure


@dataclass
class Landscape:
    """Loss values on the 1D line and the 2D plane around a checkpoint (``loss_2d[i, j]`` at
    ``(alphas[i], betas[j])``); ``center_loss`` is the loss at the checkpoint itself."""

    alphas_1d: np.ndarray
    loss_1d: np.ndarray
    alphas: np.ndarray
    betas: np.ndarray
    loss_2d: np.ndarray
    center_loss: float
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: str | Path, title: str = "") -> dict[str, Path]:
        """Write ``landscape.npz``, the two CSVs and the two PNGs into ``folder``; return their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {
            "npz": folder / "landscape.npz",
            "csv_1d": folder / "landscape_1d.csv",
            "csv_2d": folder / "landscape_2d.csv",
            "png_1d": folder / "landscape_1d.png",
            "png_2d": folder / "landscape_2d.png",
        }
        np.savez(
            paths["npz"],
            alphas_1d=self.alphas_1d,
            loss_1d=self.loss_1d,
            alphas=self.alphas,
            betas=self.betas,
            loss_2d=self.loss_2d,
            center_loss=np.array(self.center_loss),
            **{f"meta_{k}": np.array(v) for k, v in self.meta.items()},
        )
        with paths["csv_1d"].open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["alpha", "loss"])
            writer.writerows(zip(self.alphas_1d.tolist(), self.loss_1d.tolist(), strict=True))
        with paths["csv_2d"].open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["alpha", "beta", "loss"])
            for i, a in enumerate(self.alphas.tolist()):
                for j, b in enumerate(self.betas.tolist()):
                    writer.writerow([a, b, float(self.loss_2d[i, j])])
        plot_landscapes([(title, self)], paths["png_1d"], kind="1d")
        plot_landscapes([(title, self)], paths["png_2d"], kind="2d")
        return paths

    @classmethod
    def load(cls, path: str | Path) -> Landscape:
        """Read a ``landscape.npz`` written by :meth:`save`."""
        with np.load(path) as data:
            meta = {k[5:]: data[k].item() for k in data.files if k.startswith("meta_")}
            return cls(
                alphas_1d=data["alphas_1d"],
                loss_1d=data["loss_1d"],
                alphas=data["alphas"],
                betas=data["betas"],
                loss_2d=data["loss_2d"],
                center_loss=float(data["center_loss"]),
                meta=meta,
            )


def grid(span: float, steps: int) -> np.ndarray:
    """``steps`` evenly spaced points on ``[-span, span]`` with the centre exactly 0 (``steps`` odd)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 3 or steps % 2 == 0:
        raise ValueError(f"steps={steps!r} must be an odd integer >= 3 (so that the grid contains 0)")
    if not span > 0:
        raise ValueError(f"span={span!r} must be positive")
    half = steps // 2
    return span * (np.arange(steps, dtype=np.float64) - half) / half


def filter_normalized_direction(net: nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    """One random direction per parameter of ``net`` (same order as ``net.parameters()``), filter-normalized;
    zero for 1-D parameters (biases, norm weights)."""
    direction = []
    for p in net.parameters():
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
        if p.dim() <= 1:
            d.zero_()
        else:
            p_norm = p.detach().flatten(1).norm(dim=1)
            d_norm = d.flatten(1).norm(dim=1)
            d.mul_((p_norm / (d_norm + 1e-10)).view(-1, *([1] * (p.dim() - 1))))
        direction.append(d)
    return direction


class LossSurface:
    """Evaluates ``loss(theta* + sum_k c_k d_k)`` of ``module`` (a ``SegmentationModule``) on fixed batches.

    ``module.net`` is set to eval mode; its parameters are restored to ``theta*`` after every evaluation.
    """

    def __init__(self, module: nn.Module, batches: Sequence[dict[str, torch.Tensor]], seed: int = 0) -> None:
        if not batches:
            raise ValueError("no batches to evaluate the loss on (num_batches must be >= 1, data not empty)")
        self.module = module
        self.net: nn.Module = module.net
        self.batches = list(batches)
        self.params = list(self.net.parameters())
        self.origin = [p.detach().clone() for p in self.params]
        generator = torch.Generator().manual_seed(seed)
        self.directions = [filter_normalized_direction(self.net, generator) for _ in range(2)]

    @torch.no_grad()
    def loss(self, coefficients: Sequence[float] = (0.0, 0.0)) -> float:
        """Mean loss over the batches (weighted by batch size) at ``theta* + sum_k c_k d_k``."""
        self.module.eval()
        try:
            for p, origin, *dirs in zip(self.params, self.origin, *self.directions, strict=True):
                p.copy_(origin)
                for c, d in zip(coefficients, dirs, strict=False):
                    if c != 0:
                        p.add_(d, alpha=float(c))
            total, count = 0.0, 0
            for batch in self.batches:
                image, label = batch["image"], batch["label"]
                total += float(self.module.loss_fn(self.net(image), label)) * image.shape[0]
                count += image.shape[0]
            return total / count
        finally:
            for p, origin in zip(self.params, self.origin, strict=True):
                p.copy_(origin)

    def compute(
        self, span: float = 1.0, steps_1d: int = 41, steps_2d: int = 21, meta: dict[str, Any] | None = None
    ) -> Landscape:
        """The 1D curve along ``d1`` and the 2D grid over ``(d1, d2)``, both on ``[-span, span]``."""
        alphas_1d = grid(span, steps_1d)
        axis = grid(span, steps_2d)
        loss_1d = np.array([self.loss((a, 0.0)) for a in alphas_1d])
        loss_2d = np.array([[self.loss((a, b)) for b in axis] for a in axis])
        return Landscape(
            alphas_1d, loss_1d, axis, axis.copy(), loss_2d, self.loss((0.0, 0.0)), dict(meta or {})
        )


def load_run(ckpt: str | Path, config: str | Path | None = None) -> tuple[nn.Module, Any]:
    """The ``SegmentationModule`` with the checkpoint's weights and its (not yet set up) data module.

    Both are rebuilt by the training CLI from ``config`` (default: the run's ``config.yaml``, two folders up
    from ``<log_dir>/checkpoints/<name>.ckpt``).
    """
    from unetseg.training.cli import build_cli

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    config = Path(config) if config is not None else ckpt.parent.parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(
            f"no config for {ckpt}: expected the run's {config} (written by the training CLI); pass --config"
        )
    cli = build_cli(["--config", str(config), "--trainer.logger", "false", "--test", "false"])
    state = torch.load(ckpt, map_location="cpu", weights_only=False)  # a local, trusted Lightning checkpoint
    cli.model.load_state_dict(state["state_dict"])
    return cli.model, cli.datamodule


def validation_batches(datamodule: Any, num_batches: int) -> list[dict[str, torch.Tensor]]:
    """The first ``num_batches`` validation batches (the loader is not shuffled: always the same ones)."""
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches={num_batches!r} must be a positive integer")
    datamodule.setup("validate")
    batches = []
    for batch in datamodule.val_dataloader():
        batches.append({"image": batch["image"], "label": batch["label"]})
        if len(batches) == num_batches:
            break
    return batches


def landscape_from_checkpoint(
    ckpt: str | Path,
    config: str | Path | None = None,
    num_batches: int = 2,
    seed: int = 0,
    span: float = 1.0,
    steps_1d: int = 41,
    steps_2d: int = 21,
) -> Landscape:
    """Load ``ckpt`` (see :func:`load_run`) and compute its :class:`Landscape` on the validation batches."""
    grid(span, steps_1d)  # validate before the (slow) loading
    grid(span, steps_2d)
    module, datamodule = load_run(ckpt, config)
    surface = LossSurface(module, validation_batches(datamodule, num_batches), seed=seed)
    meta = {"ckpt": str(ckpt), "seed": seed, "num_batches": num_batches, "span": span}
    return surface.compute(span, steps_1d, steps_2d, meta)


def plot_landscapes(items: Sequence[tuple[str, Landscape]], path: str | Path, kind: str = "both") -> Path:
    """Plot 1D curves (overlaid), 2D contours (side by side, shared levels) or both (``kind``)."""
    plt = pyplot()
    if kind not in ("1d", "2d", "both"):
        raise ValueError(f"kind={kind!r} is not one of ['1d', '2d', 'both']")
    ncols = (1 if kind != "2d" else 0) + (len(items) if kind != "1d" else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.8), squeeze=False, constrained_layout=True)
    axes = list(axes[0])
    if kind != "2d":
        ax = axes.pop(0)
        for label, land in items:
            ax.plot(land.alphas_1d, land.loss_1d, label=label or None)
        ax.set_xlabel("alpha (direction d1)")
        ax.set_ylabel("loss")
        low = min(float(land.loss_1d.min()) for _, land in items)
        if low > 0 and max(float(land.loss_1d.max()) for _, land in items) > 20 * low:
            ax.set_yscale("log")
        ax.set_title("1D slice")
        if any(label for label, _ in items):
            ax.legend(fontsize=8)
    if kind != "1d":
        low = min(float(land.loss_2d.min()) for _, land in items)
        high = max(float(np.percentile(land.loss_2d, 95)) for _, land in items)
        levels = np.geomspace(max(low, 1e-6), max(high, low * 1.01 + 1e-6), 15)
        for ax, (label, land) in zip(axes, items, strict=True):
            contour = ax.contour(land.alphas, land.betas, land.loss_2d.T, levels=levels, cmap="viridis")
            ax.clabel(contour, fontsize=6, fmt="%.3g")
            ax.plot([0], [0], "r+", markersize=10)
            ax.set_xlabel("alpha (d1)")
            ax.set_ylabel("beta (d2)")
            ax.set_aspect("equal")
            ax.set_title(f"{label}  (centre loss {land.center_loss:.3g})".strip(), fontsize=9)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> list[Path]:
    """Command line; returns the output folders (one per checkpoint)."""
    parser = argparse.ArgumentParser(
        prog="python -m unetseg.analysis.landscape", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--ckpt", action="append", required=True, help="checkpoint (repeat to compare)")
    parser.add_argument("--label", action="append", help="label per --ckpt (default: the run folder's name)")
    parser.add_argument(
        "--config", action="append", help="config per --ckpt (default: the run's config.yaml)"
    )
    parser.add_argument("--out", default="landscape", help="output folder")
    parser.add_argument("--num_batches", type=int, default=2, help="validation batches to average over")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    parser.add_argument("--span", type=float, default=1.0, help="coefficient range [-span, span]")
    parser.add_argument("--steps_1d", type=int, default=41, help="points on the 1D curve (odd)")
    parser.add_argument("--steps_2d", type=int, default=21, help="points per axis of the 2D grid (odd)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    n = len(args.ckpt)
    for name in ("label", "config"):
        given = getattr(args, name)
        if given is not None and len(given) != n:
            parser.error(f"--{name} given {len(given)} times but --ckpt {n} times: give one per checkpoint")
    labels = args.label or [Path(c).resolve().parent.parent.parent.name or Path(c).stem for c in args.ckpt]
    configs = args.config or [None] * n
    out = Path(args.out)
    try:
        items, folders = [], []
        for ckpt, label, config in zip(args.ckpt, labels, configs, strict=True):
            land = landscape_from_checkpoint(
                ckpt, config, args.num_batches, args.seed, args.span, args.steps_1d, args.steps_2d
            )
            folder = out / label if n > 1 else out
            land.save(folder, title=label)
            items.append((label, land))
            folders.append(folder)
            print(f"{label}: centre loss {land.center_loss:.4f} -> {folder}")
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if n > 1:
        print(f"comparison -> {plot_landscapes(items, out / 'comparison.png')}")
    return folders


if __name__ == "__main__":
    main()

"""Gradient flow: per-layer-group gradient norms and update ratios over training (Drozdzal et al., 2016).

``GradientFlow`` is a Lightning callback. Every ``every_n_steps`` optimizer steps it records, for each layer
group of the net (``net.layer_groups()``: ``encoder.<i>``, ``bottleneck``, ``decoder.<i>``, ``head`` for a
:class:`~unetseg.nets.UNet`), the gradient norm ``||g||`` just before the optimizer step and the update
ratio ``||w_after - w_before|| / ||w_before||`` of that step. Drozdzal et al. ("The importance of skip
connections in biomedical image segmentation") use such per-layer plots to show how long and short skips
change where in the network the updates happen. Values go to the loggers (W&B / CSV:
``gradflow/grad_norm/<group>``, ``gradflow/update_ratio/<group>``) and, at the end of fitting, to
``gradflow.csv``, ``gradflow.json`` and the heat map ``gradflow.png`` (layer group x step) in the run's log
folder.

Use it from the CLI with ``--trainer.callbacks+=unetseg.analysis.GradientFlow``
(``--trainer.callbacks.every_n_steps 5`` after it sets its interval).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from unetseg.analysis.plotting import pyplot, save_figure

FIELDS = ("step", "epoch", "group", "grad_norm", "weight_norm", "update_norm", "update_ratio")


def layer_groups(module: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters per layer group, in data-flow order.

    Uses ``net.layer_groups()`` of ``module`` (or of ``module.net``, for a ``SegmentationModule``) when the
    net has it, otherwise the top-level children of the net that have trainable parameters.
    """
    net = getattr(module, "net", module)
    groups = (
        net.layer_groups() if callable(getattr(net, "layer_groups", None)) else dict(net.named_children())
    )
    out = {name: [p for p in part.parameters() if p.requires_grad] for name, part in groups.items()}
    return {name: params for name, params in out.items() if params}


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    """L2 norm of all ``tensors`` together."""
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors)))))


class GradientFlow(Callback):
    """Records the gradient norm and the update ratio ``||dw|| / ||w||`` per layer group every k steps.

    ``records`` holds one dict per (recorded step, group) with the keys of :data:`FIELDS`. Recording step
    ``s`` copies the group's weights before the optimizer step (one copy of the model, freed right after).

    Args:
        every_n_steps: record every k-th optimizer step (steps ``0, k, 2k, ...``).
        log: also send the values to the trainer's loggers (W&B, CSV).
        dirpath: where to write ``<filename>.{csv,json,png}`` at the end of fit; ``None`` = the trainer's
            ``log_dir``.
        filename: file stem of the outputs.

    >>> callback = GradientFlow(every_n_steps=5)
    >>> callback.every_n_steps, callback.records
    (5, [])
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        log: bool = True,
        dirpath: str | None = None,
        filename: str = "gradflow",
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} must be a positive integer")
        self.every_n_steps = every_n_steps
        self.log = log
        self.dirpath = dirpath
        self.filename = filename
        self.records: list[dict[str, Any]] = []
        self._groups: dict[str, list[nn.Parameter]] = {}
        self._pending: dict[str, Any] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._groups = layer_groups(pl_module)
        self.records = []

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        pending: dict[str, Any] = {"step": step, "epoch": trainer.current_epoch, "groups": {}}
        with torch.no_grad():
            for name, params in self._groups.items():
                grads = [p.grad for p in params if p.grad is not None]
                weights = [p.detach().clone() for p in params]
                pending["groups"][name] = (_norm(grads), weights)
        self._pending = pending

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        metrics: dict[str, float] = {}
        with torch.no_grad():
            for name, (grad_norm, before) in pending["groups"].items():
                after = [p.detach() for p in self._groups[name]]
                weight_norm = _norm(before)
                update_norm = _norm(torch._foreach_sub(after, before))
                ratio = update_norm / weight_norm if weight_norm > 0 else math.nan
                self.records.append(
                    {
                        "step": pending["step"],
                        "epoch": pending["epoch"],
                        "group": name,
                        "grad_norm": grad_norm,
                        "weight_norm": weight_norm,
                        "update_norm": update_norm,
                        "update_ratio": ratio,
                    }
                )
                metrics[f"gradflow/grad_norm/{name}"] = grad_norm
                metrics[f"gradflow/update_ratio/{name}"] = ratio
        if self.log:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=pending["step"])

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.records:
            return
        folder = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        write_records(self.records, folder / f"{self.filename}.csv", folder / f"{self.filename}.json")
        plot_gradflow(self.records, folder / f"{self.filename}.png")

    def state_dict(self) -> dict[str, Any]:
        return {"every_n_steps": self.every_n_steps, "records": self.records}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = list(state_dict.get("records", []))


def write_records(records: Sequence[dict[str, Any]], csv_path: Path, json_path: Path | None = None) -> None:
    """Write the records as CSV (one row per step and group) and, optionally, JSON (a list of dicts)."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(records)
    if json_path is not None:
        json_path.write_text(json.dumps(list(records), indent=1))


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read records written by :func:`write_records` (``.csv`` or ``.json``)."""
    path = Path(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    with path.open() as f:
        rows = list(csv.DictReader(f))
    numeric = {"grad_norm", "weight_norm", "update_norm", "update_ratio"}
    return [
        {k: (float(v) if k in numeric else int(v) if k in ("step", "epoch") else v) for k, v in row.items()}
        for row in rows
    ]


def record_matrix(records: Iterable[dict[str, Any]], key: str) -> tuple[list[str], list[int], torch.Tensor]:
    """``(groups, steps, values)``: ``values[g, s]`` is ``key`` of group ``g`` at step ``s`` (NaN if absent);
    groups keep their first-seen (data-flow) order."""
    groups: list[str] = []
    steps: list[int] = []
    table: dict[tuple[str, int], float] = {}
    for r in records:
        if r["group"] not in groups:
            groups.append(r["group"])
        if r["step"] not in steps:
            steps.append(r["step"])
        table[(r["group"], r["step"])] = float(r[key])
    steps.sort()
    values = torch.full((len(groups), len(steps)), math.nan, dtype=torch.float64)
    for (g, s), v in table.items():
        values[groups.index(g), steps.index(s)] = v
    return groups, steps, values


PANELS = (("grad_norm", "gradient norm ||g||"), ("update_ratio", "update ratio ||dw|| / ||w||"))


def plot_gradflow(
    records: Sequence[dict[str, Any]] | Sequence[tuple[str, Sequence[dict[str, Any]]]],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Heat maps (layer group x step, log10 colour scale clipped to the 2nd-98th percentile) of gradient norm
    and update ratio.

    ``records`` is one run's records, or a list of ``(label, records)`` to put runs side by side (one column
    per run, shared colour scale per row so that the runs compare directly).
    """
    plt = pyplot()
    runs = list(records)
    if runs and isinstance(runs[0], dict):
        runs = [("", runs)]
    matrices = {key: [record_matrix(r, key) for _, r in runs] for key, _ in PANELS}
    fig, axes = plt.subplots(
        len(PANELS),
        len(runs),
        figsize=(2.0 + 3.2 * len(runs), 7.0),
        squeeze=False,
        constrained_layout=True,
    )
    for row, (key, label) in enumerate(PANELS):
        logs = [torch.log10(v.clamp_min(1e-12)) for _, _, v in matrices[key]]
        finite = torch.cat([v[torch.isfinite(v)] for v in logs]) if logs else torch.zeros(1)
        # 2nd-98th percentile: a few extreme steps (e.g. the last, at learning rate ~0) do not set the scale
        vmin, vmax = (
            (float(finite.quantile(0.02)), float(finite.quantile(0.98))) if finite.numel() else (0.0, 1.0)
        )
        image = None
        for col, ((run_label, _), (groups, steps, _), logv) in enumerate(
            zip(runs, matrices[key], logs, strict=True)
        ):
            ax = axes[row][col]
            image = ax.imshow(
                logv.numpy(),
                aspect="auto",
                interpolation="nearest",
                cmap="viridis",
                vmin=vmin,
                vmax=vmax,
                extent=(steps[0] - 0.5, steps[-1] + 0.5, len(groups) - 0.5, -0.5) if steps else None,
            )
            ax.set_yticks(range(len(groups)))
            ax.set_yticklabels(groups if col == 0 else [], fontsize=7)
            ax.set_xlabel("optimizer step")
            if row == 0 and run_label:
                ax.set_title(run_label, fontsize=9)
        if image is not None:
            fig.colorbar(image, ax=list(axes[row]), label=f"log10 {label}", shrink=0.9)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_gradflow_profile(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: str | Path) -> Path:
    """Median over the recorded steps of gradient norm and update ratio per layer group (data-flow order on
    the x axis), one line per run: where in the net the gradients and updates are large."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(11, 4.2), constrained_layout=True)
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        for i, (run_label, records) in enumerate(runs):
            groups, _, values = record_matrix(records, key)
            ax.plot(
                range(len(groups)),
                values.nanmedian(dim=1).values.numpy(),
                marker="o",
                ms=3,
                label=run_label,
                color=f"C{i % 10}",
            )
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels(groups, rotation=45, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(f"median {label}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)

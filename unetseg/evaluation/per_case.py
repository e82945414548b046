"""Per-case, per-class evaluation as the field reports it: Dice, IoU, HD95, ASD and NSD in physical units.

Conventions (per case and class ``c``; ``P``/``G`` the predicted/ground-truth voxels of ``c``):

* ``dice = 2|P∩G| / (|P| + |G|)``, ``iou = |P∩G| / |P∪G|``; both empty: NaN (undefined, left out of means,
  as in nnU-Net); ground truth empty but something predicted: 0.
* ``hd95``: MONAI's ``compute_hausdorff_distance(percentile=95)``, the larger of the two directed 95th
  percentiles of surface-to-surface distances; ``asd``: MONAI's ``compute_average_surface_distance
  (symmetric=True)``, the mean over the surface voxels of both masks of the distance to the other surface.
  Distances are in the units of the voxel spacing (mm for NIfTI; 1 per pixel for PNG and synthetic data).
  Both empty: NaN (left out); exactly one empty (a missed or a hallucinated structure): the diagonal of the
  image, ``sqrt(sum((size_i * spacing_i) ** 2))``, the worst possible distance (MONAI would give inf).
* ``nsd``: normalized surface Dice at a tolerance ``tau`` (MONAI's ``compute_surface_dice``, in the units of
  the spacing): the share of the surface voxels of both masks whose distance to the other surface is at
  most ``tau``; 1 when the surfaces agree within ``tau`` everywhere. Both empty: NaN; exactly one empty: 0.
* Summary (``aggregate_over_cases``): per class the mean and median over the cases where the value is
  defined, with their count ``n``; ``foreground_mean`` is the mean of the per-class means (nnU-Net's
  summary.json). NaN is written as null.

``PerCaseEvaluation`` is a Lightning callback that applies this to the test stage and writes ``per_case.csv``
and ``summary.json`` into the run's log folder.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice

METRICS: tuple[str, ...] = ("dice", "iou", "hd95", "asd", "nsd")
CSV_COLUMNS: tuple[str, ...] = ("case_id", "class", *METRICS, "n_ref", "n_pred")
#: NSD tolerance in the units of the spacing: one for every class, or one per class (by index or by name).
Tolerance = float | Mapping[int, float] | Mapping[str, float]


def _as_index_tensor(mask: Any, name: str) -> torch.Tensor:
    """A CPU int64 tensor of class indices from an array or tensor."""
    tensor = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"{name} must hold integer class indices, got dtype {tensor.dtype}")
    return tensor.detach().cpu().long()


def case_metrics(
    pred: Any,
    label: Any,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    classes: Sequence[int] | None = None,
    nsd_tolerance: float | Mapping[int, float] = 1.0,
) -> dict[int, dict[str, float]]:
    """Metrics of one case: ``{class index: {"dice", "iou", "hd95", "asd", "nsd", "n_ref", "n_pred"}}``.

    ``pred`` and ``label`` are ``(*spatial)`` class indices (tensors or arrays), ``spacing`` one value per
    spatial axis (default 1), ``classes`` the class indices to report (default: every foreground class),
    ``nsd_tolerance`` the NSD tolerance in the units of ``spacing``: one value, or ``{class index: value}``
    for every reported class.

    >>> label = np.zeros((6, 8), dtype=np.int64); label[2, 3:5] = 1
    >>> pred = np.zeros((6, 8), dtype=np.int64); pred[2, 3] = 1
    >>> m = case_metrics(pred, label, num_classes=2, spacing=(2.0, 0.5))[1]
    >>> round(m["dice"], 4), m["iou"], round(m["hd95"], 4), round(m["asd"], 4), m["nsd"]
    (0.6667, 0.5, 0.475, 0.1667, 1.0)
    """
    p, g = _as_index_tensor(pred, "pred"), _as_index_tensor(label, "label")
    if p.shape != g.shape:
        raise ValueError(f"pred shape {tuple(p.shape)} and label shape {tuple(g.shape)} differ")
    dims = p.ndim
    spacing = [1.0] * dims if spacing is None else [float(s) for s in spacing]
    if len(spacing) != dims or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing={spacing} must be {dims} positive values (one per spatial axis)")
    classes = list(range(1, num_classes)) if classes is None else [int(c) for c in classes]
    for name, mask in (("pred", p), ("label", g)):
        if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) >= num_classes):
            raise ValueError(f"{name} has values outside 0..{num_classes - 1}")
    if not classes:
        return {}
    tolerances = _class_tolerances(nsd_tolerance, classes)
    # one-hot (1, C, *spatial) of the reported classes, as MONAI expects
    one_p = F.one_hot(p, num_classes).movedim(-1, 0)[classes][None].bool()
    one_g = F.one_hot(g, num_classes).movedim(-1, 0)[classes][None].bool()
    axes = tuple(range(2, 2 + dims))
    tp = (one_p & one_g).sum(axes)[0].double()
    n_pred, n_ref = one_p.sum(axes)[0].double(), one_g.sum(axes)[0].double()
    hd95, asd, nsd = _surface_metrics(one_p, one_g, spacing, tolerances)
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(p.shape, spacing, strict=True)))
    out: dict[int, dict[str, float]] = {}
    for i, c in enumerate(classes):
        union = float(n_pred[i] + n_ref[i] - tp[i])
        both_empty = n_pred[i] == 0 and n_ref[i] == 0
        one_empty = (n_pred[i] == 0) != (n_ref[i] == 0)
        distances = {}
        for name, value in (("hd95", hd95[0, i]), ("asd", asd[0, i])):
            distances[name] = math.nan if both_empty else diagonal if one_empty else float(value)
        out[c] = {
            "dice": math.nan if both_empty else float(2 * tp[i] / (n_pred[i] + n_ref[i])),
            "iou": math.nan if both_empty else float(tp[i]) / union,
            **distances,
            "nsd": math.nan if both_empty else 0.0 if one_empty else float(nsd[0, i]),
            "n_ref": int(n_ref[i]),
            "n_pred": int(n_pred[i]),
        }
    return out


def check_tolerance(tolerance: Tolerance, name: str = "nsd_tolerance") -> None:
    """Raise naming ``name`` unless ``tolerance`` is a finite number >= 0 or a mapping of them."""
    values = tolerance.values() if isinstance(tolerance, Mapping) else [tolerance]
    ok = all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in values
    )
    if not ok or (isinstance(tolerance, Mapping) and not tolerance):
        raise ValueError(
            f"{name}={tolerance!r}: expected a finite number >= 0 (in the units of the spacing, mm for "
            "NIfTI) or a non-empty mapping of class -> such a number"
        )


def _class_tolerances(tolerance: float | Mapping[int, float], classes: Sequence[int]) -> list[float]:
    """The NSD tolerance of each of ``classes`` (one for all, or a ``{class index: value}`` covering them)."""
    check_tolerance(tolerance)
    if not isinstance(tolerance, Mapping):
        return [float(tolerance)] * len(classes)
    missing = [c for c in classes if c not in tolerance]
    if missing:
        raise ValueError(
            f"nsd_tolerance={dict(tolerance)!r} has no value for class(es) {missing}; give one per reported "
            f"class {list(classes)} or a single number"
        )
    return [float(tolerance[c]) for c in classes]


def _surface_metrics(
    one_p: torch.Tensor, one_g: torch.Tensor, spacing: Sequence[float], tolerances: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MONAI's HD95, symmetric ASD and NSD (at ``tolerances``, one per class) ``(1, C)`` of one-hot masks
    ``(1, C, *spatial)`` (raw values where a mask is empty)."""
    with warnings.catch_warnings():  # MONAI warns for every empty mask; case_metrics' convention handles them
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(
            one_p, one_g, include_background=True, percentile=95, spacing=spacing
        )
        asd = compute_average_surface_distance(
            one_p, one_g, include_background=True, symmetric=True, spacing=spacing
        )
        nsd = compute_surface_dice(
            one_p, one_g, list(tolerances), include_background=True, spacing=list(spacing)
        )
    return hd95, asd, nsd


def case_rows(
    case_id: str,
    pred: Any,
    label: Any,
    class_names: Sequence[str],
    spacing: Sequence[float] | None = None,
    include_background: bool = False,
    nsd_tolerance: float | Mapping[str, float] = 1.0,
) -> list[dict[str, Any]]:
    """One CSV row per reported class of a case (columns ``CSV_COLUMNS``); ``nsd_tolerance`` is one value or
    ``{class name: value}`` for every reported class."""
    classes = range(0 if include_background else 1, len(class_names))
    tolerance = nsd_tolerance
    if isinstance(nsd_tolerance, Mapping):
        check_tolerance_names(nsd_tolerance, [class_names[c] for c in classes])
        tolerance = {c: nsd_tolerance[class_names[c]] for c in classes}
    metrics = case_metrics(pred, label, len(class_names), spacing, classes, tolerance)
    return [{"case_id": case_id, "class": class_names[c], **metrics[c]} for c in classes]


def check_tolerance_names(tolerance: Mapping[str, float], class_names: Sequence[str]) -> None:
    """Raise unless the per-class NSD ``tolerance`` names exactly the reported ``class_names``."""
    unknown = sorted(set(tolerance) - set(class_names))
    missing = [name for name in class_names if name not in tolerance]
    if unknown or missing:
        raise ValueError(
            f"NSD tolerance {dict(tolerance)!r}: unknown class(es) {unknown}, missing class(es) {missing}; "
            f"give one value per reported class {list(class_names)} or a single number"
        )


def _stats(values: Sequence[float], spread: bool = False) -> dict[str, float | int]:
    """Mean, median and count of the defined (non-NaN) values; with ``spread`` also their sample standard
    deviation (NaN for fewer than two)."""
    defined = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    stats: dict[str, float | int] = {"mean": math.nan, "median": math.nan, "n": int(defined.size)}
    if defined.size:
        stats.update(mean=float(defined.mean()), median=float(np.median(defined)))
    if spread:
        stats["std"] = float(defined.std(ddof=1)) if defined.size > 1 else math.nan
    return stats


def aggregate_over_cases(
    rows: Sequence[dict[str, Any]], class_names: Sequence[str], spread: bool = False
) -> dict[str, Any]:
    """Per-case rows aggregated over the cases per class and metric (mean, median, count of defined values;
    with ``spread`` also the sample standard deviation ``std``), and the foreground mean of the class means
    (nnU-Net's summary.json):
    ``{"num_cases", "per_class": {class: {metric: {mean, median, n}}}, "foreground_mean": {metric}}``."""
    names = [c for c in class_names if any(r["class"] == c for r in rows)]
    per_class = {
        name: {m: _stats([r.get(m, math.nan) for r in rows if r["class"] == name], spread) for m in METRICS}
        for name in names
    }
    foreground = [name for name in names if name != class_names[0]] or names
    foreground_mean = {
        m: _stats([per_class[name][m]["mean"] for name in foreground])["mean"] for m in METRICS
    }
    return {
        "num_cases": len({r["case_id"] for r in rows}),
        "per_class": per_class,
        "foreground_mean": foreground_mean,
    }


def json_safe(value: Any) -> Any:
    """NaN/inf floats -> None (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_results(
    rows: Sequence[dict[str, Any]],
    summary: dict[str, Any],
    folder: str | Path,
    columns: Sequence[str] = CSV_COLUMNS,
) -> tuple[Path, Path]:
    """Write ``per_case.csv`` (``columns``) and ``summary.json`` into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = folder / "per_case.csv", folder / "summary.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    return csv_path, json_path


def _per_sample(value: Any, batch_size: int, default: Any) -> list[Any]:
    """A collated batch entry (tensor (B, ...), list of B values, or list of per-axis tensors) per sample."""
    if value is None:
        return [default] * batch_size
    if isinstance(value, torch.Tensor):
        return [v.tolist() if v.ndim else v.item() for v in value.detach().cpu()]
    value = list(value)
    if value and isinstance(value[0], torch.Tensor) and value[0].ndim == 1 and len(value) != batch_size:
        return torch.stack([v.detach().cpu() for v in value], dim=1).tolist()  # default_collate of tuples
    if len(value) != batch_size:
        raise ValueError(f"batch entry has {len(value)} values for {batch_size} samples")
    return [v.tolist() if isinstance(v, torch.Tensor) else v for v in value]


class PerCaseEvaluation(Callback):
    """Test-stage per-case metrics (``case_metrics``) written as ``per_case.csv`` + ``summary.json``.

    Uses the predictions ``test_step`` returns (``{"pred": (B, *spatial)}``) and the batch's ``label``,
    ``case_id`` and ``spacing`` (defaults: a running number and spacing 1, e.g. synthetic data); batches
    without ``label`` are skipped. 2D slices of volumes (batches with ``slice_index``) are stacked per case
    along a last axis, in slice order, and evaluated as one volume; the spacing along that axis is the
    batch's ``slice_spacing`` when it has one, else 1. Under DDP the rows are gathered (duplicate case ids
    from sampler padding dropped) and only global rank 0 writes files. Logged (to every logger, returned by
    ``trainer.test``): ``test/case_dice``, ``test/case_iou``, ``test/hd95``, ``test/asd`` (foreground means of
    the per-class means), ``test/nsd`` and ``test/<metric>/<class>``; W&B also gets the table
    ``test/per_case``.

    In YAML: ``trainer.callbacks: [{class_path: unetseg.evaluation.PerCaseEvaluation, init_args:
    {nsd_tolerance_mm: {liver: 2.0, tumour: 1.0}}}]``.

    Args:
        output_dir: folder for the files; ``None`` uses the trainer's ``log_dir``.
        include_background: also report class 0.
        nsd_tolerance_mm: tolerance of the normalized surface Dice in the units of the spacing (mm for NIfTI,
            pixels for 2D images and synthetic data): one for every class, or ``{class name: value}`` naming
            every reported class.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        include_background: bool = False,
        nsd_tolerance_mm: float | dict[str, float] = 1.0,
    ) -> None:
        check_tolerance(nsd_tolerance_mm, "nsd_tolerance_mm")
        self.output_dir = output_dir
        self.include_background = include_background
        self.nsd_tolerance_mm = nsd_tolerance_mm
        self.rows: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self._slices: dict[str, list[tuple[int, np.ndarray, np.ndarray, list[float]]]] = {}
        self._count = 0

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(self.nsd_tolerance_mm, Mapping):  # before any case is evaluated
            names = pl_module.class_names[0 if self.include_background else 1 :]
            check_tolerance_names(self.nsd_tolerance_mm, names)
        self.rows, self.summary, self._slices, self._count = [], {}, {}, 0

    def _rows(self, case_id: str, pred: Any, label: Any, class_names: Sequence[str], spacing: Any) -> list:
        """The CSV rows of one case with this callback's settings."""
        return case_rows(
            case_id, pred, label, class_names, spacing, self.include_background, self.nsd_tolerance_mm
        )

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(batch, dict) or batch.get("label") is None:
            return
        if not isinstance(outputs, dict) or "pred" not in outputs:
            raise RuntimeError("PerCaseEvaluation needs test_step to return {'pred': (B, *spatial) indices}")
        pred, label = outputs["pred"].detach().cpu(), batch["label"].detach().cpu()
        n, dims = pred.shape[0], pred.ndim - 1
        prefix = f"rank{trainer.global_rank}_" if trainer.world_size > 1 else ""
        ids = _per_sample(batch.get("case_id"), n, None)
        ids = [str(i) if i is not None else f"{prefix}case_{self._count + k:05d}" for k, i in enumerate(ids)]
        self._count += n
        spacings = _per_sample(batch.get("spacing"), n, [1.0] * dims)
        slices = _per_sample(batch.get("slice_index"), n, None)
        slice_spacing = _per_sample(batch.get("slice_spacing"), n, 1.0)
        for k in range(n):
            if slices[k] is None:
                self.rows += self._rows(ids[k], pred[k], label[k], pl_module.class_names, spacings[k])
            else:
                entry = (int(slices[k]), pred[k].numpy().astype(np.uint8), label[k].numpy().astype(np.uint8))
                self._slices.setdefault(ids[k], []).append((*entry, [*spacings[k], float(slice_spacing[k])]))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows, slices = self.rows, self._slices
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, (rows, slices))
            rows = [row for part_rows, _ in gathered for row in part_rows]
            slices = {}
            for _, part in gathered:
                for case_id, items in part.items():
                    slices.setdefault(case_id, []).extend(items)
        for case_id, items in slices.items():
            by_index = {index: (p, g, s) for index, p, g, s in items}  # padding duplicates collapse
            order = sorted(by_index)
            pred = np.stack([by_index[i][0] for i in order], axis=-1).astype(np.int64)
            label = np.stack([by_index[i][1] for i in order], axis=-1).astype(np.int64)
            rows += self._rows(case_id, pred, label, pl_module.class_names, by_index[order[0]][2])
        unique: dict[tuple[str, str], dict[str, Any]] = {}
        for row in rows:  # DistributedSampler pads with repeated cases: keep the first
            unique.setdefault((row["case_id"], row["class"]), row)
        self.rows = list(unique.values())
        self.summary = aggregate_over_cases(self.rows, pl_module.class_names)
        if not self.rows:
            return
        logged = {f"test/{_key(m)}": v for m, v in self.summary["foreground_mean"].items()}
        for name, stats in self.summary["per_class"].items():
            logged.update({f"test/{_key(m)}/{name}": s["mean"] for m, s in stats.items()})
        pl_module.log_dict(logged)  # identical on every rank (gathered)
        folder = self.output_dir or trainer.log_dir or trainer.default_root_dir  # log_dir: a collective
        if trainer.is_global_zero:
            write_results(self.rows, self.summary, folder)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    data = [[r[c] for c in CSV_COLUMNS] for r in self.rows]
                    logger.log_table(key="test/per_case", columns=list(CSV_COLUMNS), data=data)


def _key(metric: str) -> str:
    """Logged name of a per-case metric: ``dice``/``iou`` get a ``case_`` prefix (``test/dice`` is global)."""
    return f"case_{metric}" if metric in ("dice", "iou") else metric

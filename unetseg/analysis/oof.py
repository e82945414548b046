"""Out-of-fold evaluation of a cross-validation: every training case predicted by the fold that held it out.

:func:`evaluate_out_of_fold` predicts each fold's validation cases from their image files with that fold's
checkpoint (:class:`unetseg.inference.predict.Predictor`, the code path of ``python -m
unetseg.inference.predict``), writes the masks, compares them with the label files (Dice, IoU, HD95, ASD, NSD
per case and class: :mod:`unetseg.evaluation.per_case`) and decides the postprocessing on these predictions
(:func:`unetseg.inference.postprocess.decide_postprocessing`), as nnU-Net does. Files, in ``<out_dir>``:

* ``oof/predictions/<case>.nii.gz`` (or ``.png``): the raw out-of-fold masks (before postprocessing);
* ``oof/per_case.csv``: ``fold``, then the columns of ``per_case.csv`` (one row per case and class);
* ``oof/summary.json``: per class mean, median, std and count ``n`` of each metric over the cases, the
  ``foreground_mean`` of the class means, the folds (checkpoint, validation cases), the NSD tolerance and the
  postprocessing with the out-of-fold Dice before and after it;
* ``oof/summary.md``: the same as tables;
* ``postprocessing.json``: what ``python -m unetseg.inference.predict --ckpt <out_dir>`` applies.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unetseg.data.formats.io import read_array, read_label
from unetseg.data.formats.layout import Case, DatasetSpec
from unetseg.evaluation.per_case import CSV_COLUMNS, METRICS, aggregate_over_cases, case_rows, write_results
from unetseg.inference.cases import InputCase, write_mask
from unetseg.inference.postprocess import POSTPROCESSING_FILE, Postprocessing, decide_postprocessing
from unetseg.inference.predict import Predictor

OOF_DIR = "oof"
OOF_COLUMNS: tuple[str, ...] = ("fold", *CSV_COLUMNS)
DISTANCES = ("hd95", "asd")  # in the units of the spacing; the other metrics are ratios in [0, 1]


@dataclass
class Fold:
    """One fold of a cross-validation: its index, its best checkpoint and its validation cases.

    >>> checkpoint = Path("runs/cv/fold_0/version_0/checkpoints/best-epoch011-dice0.8731.ckpt")
    >>> fold = Fold(0, checkpoint, spec.cases_train[:2])  # doctest: +SKIP
    """

    index: int
    checkpoint: Path
    cases: list[Case]


def _predict_fold(
    fold: Fold, spec: DatasetSpec, folder: Path, nsd_tolerance: float | Mapping[str, float], device: str
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Predict the validation cases of ``fold`` into ``folder``; their metric rows and mask files by case."""
    predictor = Predictor.from_checkpoint(fold.checkpoint, device)
    if predictor.module.class_names != list(spec.class_names):
        raise ValueError(
            f"checkpoint {fold.checkpoint} has the classes {predictor.module.class_names}, the dataset "
            f"{spec.root} {list(spec.class_names)}"
        )
    rows: list[dict[str, Any]] = []
    files: dict[str, Path] = {}
    for case in fold.cases:
        label = read_label(case, spec)
        if label is None:
            raise ValueError(f"validation case {case.case_id} of fold {fold.index} has no label file")
        source = InputCase(case.case_id, list(case.images))
        image, spacing, reference = predictor.read_case(source)
        mask = predictor.predict_array(image, spacing, name=str(case.images[0]))
        files[case.case_id] = write_mask(mask, source, reference, folder)
        metrics = case_rows(case.case_id, mask, label, spec.class_names, spacing, nsd_tolerance=nsd_tolerance)
        rows += [{"fold": fold.index, **row} for row in metrics]
    return rows, files


def _pairs(
    files: Mapping[str, Path], cases: Sequence[Case], spec: DatasetSpec
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """``(prediction, label)`` index arrays of the saved masks, one case at a time."""
    for case in cases:
        prediction = np.asarray(read_array(files[case.case_id], is_mask=True), dtype=np.int64)
        yield prediction, read_label(case, spec)


def _mean(values: Sequence[float | None]) -> float:
    """Mean of the defined values (``None``/NaN left out); NaN when there is none."""
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def evaluate_out_of_fold(
    folds: Sequence[Fold],
    spec: DatasetSpec,
    out_dir: str | Path,
    nsd_tolerance: float | Mapping[str, float] = 1.0,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Predict, evaluate and postprocess the out-of-fold cases of ``folds``; writes the files listed in the
    module docstring and returns the summary (that of ``oof/summary.json``).

    ``nsd_tolerance``: NSD tolerance in the units of the spacing (mm for NIfTI), one or per class name.
    """
    out_dir = Path(out_dir)
    folder = out_dir / OOF_DIR
    shutil.rmtree(folder / "predictions", ignore_errors=True)  # no masks left from an earlier evaluation
    rows: list[dict[str, Any]] = []
    files: dict[str, Path] = {}
    for fold in folds:
        log(f"out-of-fold: fold {fold.index}: {len(fold.cases)} case(s) with {fold.checkpoint}")
        fold_rows, fold_files = _predict_fold(fold, spec, folder / "predictions", nsd_tolerance, device)
        rows += fold_rows
        files |= fold_files
    cases = [case for fold in folds for case in fold.cases]
    postprocessing = decide_postprocessing(_pairs(files, cases, spec), spec.class_names)
    postprocessing.to_json(out_dir / POSTPROCESSING_FILE)
    summary = aggregate_over_cases(rows, spec.class_names, spread=True)
    summary["nsd_tolerance"] = nsd_tolerance
    summary["folds"] = {
        str(fold.index): {"checkpoint": str(fold.checkpoint), "cases": [c.case_id for c in fold.cases]}
        for fold in folds
    }
    summary["postprocessing"] = {
        "applied": str(postprocessing),
        "dice_before": postprocessing.dice_before,
        "dice_after": postprocessing.dice_after,
        "mean_before": _mean(list(postprocessing.dice_before.values())),
        "mean_after": _mean(list(postprocessing.dice_after.values())),
    }
    write_results(rows, summary, folder, OOF_COLUMNS)
    (folder / "summary.md").write_text(summary_markdown(summary, rows, postprocessing))
    log(f"out-of-fold: {len(cases)} case(s): {folder / 'summary.md'}; postprocessing: {postprocessing}")
    return summary


def _number(value: float | None, metric: str = "dice") -> str:
    """A value of ``metric``: distances with 2 decimals, ratios with 4; ``n/a`` when undefined."""
    digits = 2 if metric in DISTANCES else 4
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _cell(stats: Mapping[str, Any], metric: str) -> str:
    """``mean ± std (n)`` of one class and metric."""
    if math.isnan(stats["mean"]):
        return "n/a (0)"
    std = stats.get("std", math.nan)
    spread = "" if math.isnan(std) else f" ± {_number(std, metric)}"
    return f"{_number(stats['mean'], metric)}{spread} ({stats['n']})"


def summary_markdown(
    summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], postprocessing: Postprocessing
) -> str:
    """``oof/summary.md``: per class mean ± std (n) over the cases, the foreground mean, the folds, and the
    postprocessing with the out-of-fold Dice before and after it."""
    header = ["class", "Dice", "IoU", "HD95", "ASD", "NSD"]
    counts = f"{summary['num_cases']} cases, {len(summary['folds'])} folds"
    lines = [
        f"# Cross-validation: out-of-fold results ({counts})",
        "",
        "Every training case predicted by the fold that did not train on it (the fold's best checkpoint), "
        "compared with its label. Per class: mean ± sample std over the cases (n = cases where the value is "
        "defined); HD95 and ASD in the units of the spacing (mm for NIfTI), NSD at a tolerance of "
        f"{summary['nsd_tolerance']} in the same units.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, stats in summary["per_class"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(stats[m], m) for m in METRICS) + " |")
    means = [_number(summary["foreground_mean"][m], m) for m in METRICS]
    lines += ["| **foreground mean** | " + " | ".join(means) + " |", "", "## Folds", ""]
    lines += ["| fold | cases | Dice (mean over its cases and classes) | checkpoint |", "|---|---|---|---|"]
    for index, fold in summary["folds"].items():
        dice = _mean([r["dice"] for r in rows if str(r["fold"]) == index])
        lines.append(f"| {index} | {len(fold['cases'])} | {_number(dice)} | `{fold['checkpoint']}` |")
    lines += [
        "",
        "## Postprocessing",
        "",
        f"Decided on the out-of-fold predictions: **{postprocessing}**. Written to `{POSTPROCESSING_FILE}`, "
        "which `python -m unetseg.inference.predict --ckpt <this folder>` applies. Dice per class over all "
        "out-of-fold voxels (true/false positives and false negatives summed over the cases):",
        "",
        "| class | Dice before | Dice after |",
        "|---|---|---|",
    ]
    for name, before in postprocessing.dice_before.items():
        lines.append(f"| {name} | {_number(before)} | {_number(postprocessing.dice_after.get(name))} |")
    pp = summary["postprocessing"]
    lines.append(f"| **mean** | {_number(pp['mean_before'])} | {_number(pp['mean_after'])} |")
    return "\n".join(lines) + "\n"

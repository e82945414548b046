"""The worked real study (docs/study.md), end to end and timed: the real-MRI benchmark in 3D, 3-fold
cross-validation, ensemble prediction of the held-out test slabs with the postprocessing decided out of fold,
and the test evaluation (Dice, NSD per class), each stage with its wall time.

Stages, in ``--workdir DIR``:

1. **build**: ``DIR/data``, the real-MRI benchmark (:func:`benchmarks.real_mri.build_dataset`, default 2 mm in
   axial slabs of 6 slices; ``--cutout`` builds the small test fixture instead). Its ``splits.json`` ``test``
   slabs are held out of the cross-validation (``--data.test_ids``); the other slabs are split into the folds.
2. **crossval**: ``python -m unetseg.analysis.crossval --config study/real_mri_3d --folds 3 --out DIR/cv``
   (each fold also tests its own best checkpoint on the test slabs), then the out-of-fold evaluation and the
   postprocessing decision (``DIR/cv/oof/summary.json``, ``DIR/cv/postprocessing.json``).
3. **predict**: ``python -m unetseg.inference.predict --ckpt DIR/cv`` on the test images
   (``DIR/test/images``): the average of the folds, with the postprocessing (``DIR/test/postprocessed``) and
   without it (``--postprocessing none``, ``DIR/test/raw``).
4. **evaluate**: each mask against its label with :func:`unetseg.evaluation.per_case.case_rows` (Dice, IoU,
   HD95, ASD, NSD at 1 mm): ``DIR/test/<raw|postprocessed>/per_case.csv`` and ``summary.json``.

``DIR/study.json`` holds every figure, the commands, the stage times and the machine (with its load average
before and after: the machine may be shared); ``DIR/study.md`` is the table of docs/study.md. Every argument
that is not an option below goes to the training command line of every fold (``--trainer.max_steps 40``).

Command line::

    python -m benchmarks.real_study --workdir runs/study [--folds 3] [--jobs 3] [--threads 1] [--force]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import real_mri
from benchmarks._common import load_average, machine_info

CONFIG = "study/real_mri_3d"
STAGES = ("build", "crossval", "predict", "evaluate")
VARIANTS = ("raw", "postprocessed")  # the ensemble's test masks without / with postprocessing.json
NSD_TOLERANCE_MM = 1.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.real_study",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        allow_abbrev=False,
    )
    parser.add_argument("--workdir", type=Path, required=True, help="folder for the data, runs and tables")
    parser.add_argument("--config", default=CONFIG, help=f"training config of the folds (default {CONFIG})")
    parser.add_argument("--folds", type=int, default=3, help="cross-validation folds (default 3)")
    parser.add_argument("--jobs", type=int, default=3, help="folds trained at a time (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per fold (default 1)")
    parser.add_argument("--spacing", type=int, default=2, help="dataset spacing in mm (default 2)")
    parser.add_argument("--slab", type=int, default=6, help="axial slices per case (default 6)")
    parser.add_argument("--cutout", action="store_true", help="the small test cut-out instead (smoke runs)")
    parser.add_argument("--force", action="store_true", help="delete an earlier study in --workdir first")
    return parser


def build_data(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """Write the dataset to ``workdir/data``; returns its root and the held-out test case ids."""
    root = args.workdir / "data"
    if args.cutout:
        real_mri.build_cutout(root, force=True)
    else:
        real_mri.build_dataset(root, spacing=args.spacing, slab=args.slab, force=True)
    test_ids = json.loads((root / real_mri.SPLIT_FILE).read_text())["test"]
    return root, list(test_ids)


def crossval_args(args: argparse.Namespace, root: Path, test_ids: Sequence[str], train_args: Sequence[str]):
    """The cross-validation command line (without ``python -m unetseg.analysis.crossval``)."""
    return [
        "--config", args.config, "--data.root", str(root), "--data.test_ids", json.dumps(list(test_ids)),
        "--folds", str(args.folds), "--out", str(args.workdir / "cv"), "--jobs", str(args.jobs),
        "--threads", str(args.threads), *train_args,
    ]  # fmt: skip


def run_crossval(argv: list[str]) -> None:
    """Train the folds, evaluate out of fold, decide the postprocessing; raises if the command fails."""
    from unetseg.analysis import crossval

    status = crossval.main(argv)
    if status != 0:
        raise RuntimeError(
            f"python -m unetseg.analysis.crossval {' '.join(argv)} exited with status {status}"
        )


def copy_test_images(root: Path, test_ids: Sequence[str], folder: Path) -> Path:
    """Copy the test cases' images into ``folder`` (the predict command's ``--input``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for case_id in test_ids:
        shutil.copy2(root / "imagesTr" / f"{case_id}.nii.gz", folder / f"{case_id}.nii.gz")
    return folder


def predict_args(cv_dir: Path, images: Path, output: Path, variant: str) -> list[str]:
    """The predict command line of the fold ensemble, with (``postprocessed``) or without (``raw``)
    ``cv_dir/postprocessing.json``."""
    extra = ["--postprocessing", "none"] if variant == "raw" else []
    return ["--ckpt", str(cv_dir), "--input", str(images), "--output", str(output), *extra]


def run_predict(argv: list[str]) -> None:
    """``python -m unetseg.inference.predict`` in this process; raises if a case failed."""
    from unetseg.inference import predict

    status = predict.main(argv)
    if status != 0:
        raise RuntimeError(
            f"python -m unetseg.inference.predict {' '.join(argv)} exited with status {status}"
        )


def evaluate(root: Path, test_ids: Sequence[str], masks: Path) -> dict[str, Any]:
    """Per-case metrics of the masks in ``masks`` against the labels; writes ``per_case.csv`` and
    ``summary.json`` there and returns the summary, with the Dice over all test voxels (``global_dice``)."""
    import nibabel as nib

    from unetseg.evaluation.per_case import aggregate_over_cases, case_rows, write_results
    from unetseg.inference.postprocess import class_counts, pooled_dice

    class_names = list(real_mri.CLASS_NAMES)
    rows: list[dict[str, Any]] = []
    counts = np.zeros((len(class_names), 3), dtype=np.int64)  # per class: TP, FP, FN over all test voxels
    for case_id in test_ids:
        label_img = nib.load(root / "labelsTr" / f"{case_id}.nii.gz")
        label = np.asarray(label_img.dataobj, dtype=np.int64)
        mask = np.asarray(nib.load(masks / f"{case_id}.nii.gz").dataobj, dtype=np.int64)
        if mask.shape != label.shape:
            raise ValueError(f"{masks / case_id}.nii.gz has shape {mask.shape}, its label {label.shape}")
        spacing = [float(z) for z in label_img.header.get_zooms()[:3]]
        rows += case_rows(case_id, mask, label, class_names, spacing, nsd_tolerance=NSD_TOLERANCE_MM)
        counts += class_counts(mask, label, len(class_names))
    summary = aggregate_over_cases(rows, class_names, spread=True)
    # NaN (a class in neither masks nor labels) is written as null
    summary["global_dice"] = dict(zip(class_names, pooled_dice(counts).tolist(), strict=True))
    write_results(rows, summary, masks)
    return summary


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished, waited-for children (the folds)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Stopwatch:
    """Wall time and CPU time (this process and its children: :func:`cpu_seconds`) per named stage, in
    seconds. On a shared machine the CPU time divided by the cores is the wall time the stage would take
    alone (when it keeps every core busy).

    >>> watch = Stopwatch()
    >>> watch("build", lambda: 1), list(watch.seconds), list(watch.cpu)
    (1, ['build'], ['build'])
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def __call__(self, stage: str, fn: Callable[[], Any]) -> Any:
        start, cpu = time.perf_counter(), cpu_seconds()
        try:
            return fn()
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - start, 2)
            self.cpu[stage] = round(self.cpu.get(stage, 0.0) + cpu_seconds() - cpu, 2)


def fold_records(cv_dir: Path, folds: int) -> list[dict[str, Any]]:
    """Per fold: steps, times, best checkpoint, and its own test Dice per class (its ``result.json``)."""
    records = []
    for k in range(folds):
        result = json.loads((cv_dir / f"fold_{k}" / "result.json").read_text())
        test = result.get("test") or {}
        records.append(
            {
                "fold": k,
                "global_steps": result["global_steps"],
                "wall_time_s": result["wall_time_s"],
                "best_model_path": result["best_model_path"],
                "test_dice": {name: test.get(f"test/dice/{name}") for name in real_mri.CLASS_NAMES[1:]}
                | {"mean": test.get("test/dice")},
            }
        )
    return records


def _fmt(value: float | None, digits: int = 3) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
    )


def _mean_std(stats: dict[str, Any]) -> str:
    std = stats.get("std")
    spread = "" if std is None or math.isnan(std) else f" ± {std:.3f}"
    return f"{_fmt(stats['mean'])}{spread} ({stats['n']})"


def _oof_table(study: dict[str, Any]) -> list[str]:
    """Out-of-fold Dice and NSD per class, and the Dice over all voxels before / after postprocessing."""
    oof, pp = study["oof"], study["postprocessing"]
    lines = [
        f"Out of fold ({oof['num_cases']} training slabs, each segmented by the fold that did not train on "
        "it):",
        "",
        "| class | Dice per slab | NSD per slab | Dice over all voxels | after postprocessing |",
        "|---|---|---|---|---|",
    ]
    for name in real_mri.CLASS_NAMES[1:]:
        stats = oof["per_class"][name]
        before, after = _fmt(pp["dice_before"].get(name)), _fmt(pp["dice_after"].get(name))
        lines.append(
            f"| {name} | {_mean_std(stats['dice'])} | {_mean_std(stats['nsd'])} | {before} | {after} |"
        )
    fg = oof["foreground_mean"]
    means = [_fmt(pp.get(k)) for k in ("mean_before", "mean_after")]
    lines.append(f"| **mean** | {_fmt(fg['dice'])} | {_fmt(fg['nsd'])} | {means[0]} | {means[1]} |")
    return [*lines, "", f"Postprocessing decided out of fold: {pp['applied']}.", ""]


def _test_row(name: str, study: dict[str, Any]) -> str:
    """One class (or ``mean``) of the test table."""
    raw, post = study["test"]["raw"], study["test"]["postprocessed"]
    singles = [_fmt(f["test_dice"][name]) for f in study["folds"]]
    if name == "mean":
        classes = real_mri.CLASS_NAMES[1:]
        cells = [_fmt(_nanmean([v["global_dice"][c] for c in classes])) for v in (raw, post)]
        cells += [_fmt(v["foreground_mean"][m]) for v, m in ((raw, "dice"), (post, "dice"), (raw, "nsd"))]
        cells.append(_fmt(post["foreground_mean"]["nsd"]))
        name = "**mean**"
    else:
        cells = [_fmt(raw["global_dice"][name]), _fmt(post["global_dice"][name])]
        cells += [_mean_std(raw["per_class"][name]["dice"]), _mean_std(post["per_class"][name]["dice"])]
        cells += [_fmt(v["per_class"][name]["nsd"]["mean"]) for v in (raw, post)]
    return f"| {name} | {' | '.join(singles)} | {' | '.join(cells)} |"


def _test_table(study: dict[str, Any]) -> list[str]:
    """Test Dice of each fold alone and of the ensemble (over all voxels and per slab), and NSD."""
    folds = " | ".join(f"fold {f['fold']}" for f in study["folds"])
    return [
        f"Held-out test slabs ({', '.join(study['dataset']['test_ids'])}): Dice over all test voxels of each "
        "fold alone and of the ensemble, then the ensemble's Dice and NSD per slab (mean ± std (n)); pp = "
        "with the postprocessing:",
        "",
        f"| class | {folds} | ensemble | ensemble + pp | Dice per slab | + pp | NSD per slab | + pp |",
        "|---|" + "---|" * (len(study["folds"]) + 6),
        *(_test_row(name, study) for name in [*real_mri.CLASS_NAMES[1:], "mean"]),
        "",
    ]


def markdown(study: dict[str, Any]) -> str:
    """The tables of docs/study.md from a ``study.json`` dict."""
    secs, cpu, folds = study["seconds"], study.get("cpu_seconds", {}), study["folds"]
    lines = [
        *_oof_table(study),
        *_test_table(study),
        "| stage | wall time | CPU time (all processes) |",
        "|---|---|---|",
        *(f"| {stage} | {_duration(secs[stage])} | {_duration(cpu.get(stage))} |" for stage in STAGES),
        f"| **total** | **{_duration(secs['total'])}** | {_duration(cpu.get('total'))} |",
        "",
        f"Steps per fold: {', '.join(str(f['global_steps']) for f in folds)}; wall time per fold (training, "
        f"validation, test): {', '.join(_duration(f['wall_time_s']) for f in folds)} ({study['jobs']} at a "
        "time, "
        f"{study['threads']} thread(s) each). Load average (1, 5, 15 min) before / after: "
        f"{study['load_average_before']} / {study['load_average_after']} on "
        f"{study['machine']['logical_cores']} logical cores.",
    ]
    return "\n".join(lines) + "\n"


def _nanmean(values: Sequence[float | None]) -> float:
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def run_study(args: argparse.Namespace, train_args: Sequence[str]) -> dict[str, Any]:
    """Every stage, timed; writes ``study.json`` and ``study.md`` into the workdir and returns the figures."""
    workdir: Path = args.workdir
    if args.force and workdir.exists():
        shutil.rmtree(workdir)
    if (workdir / "cv").exists():
        raise FileExistsError(f"{workdir} already holds a study; pass --force to start again")
    workdir.mkdir(parents=True, exist_ok=True)
    before, watch = load_average(), Stopwatch()
    root, test_ids = watch("build", lambda: build_data(args))
    cv_argv = crossval_args(args, root, test_ids, train_args)
    watch("crossval", lambda: run_crossval(cv_argv))
    images = copy_test_images(root, test_ids, workdir / "test" / "images")
    predict_argv = {v: predict_args(workdir / "cv", images, workdir / "test" / v, v) for v in VARIANTS}
    for variant in VARIANTS:
        watch("predict", lambda v=variant: run_predict(predict_argv[v]))
    test = {
        v: watch("evaluate", lambda v=v: evaluate(root, test_ids, workdir / "test" / v)) for v in VARIANTS
    }
    oof = json.loads((workdir / "cv" / "oof" / "summary.json").read_text())
    study = {
        "commands": {
            "crossval": ["python", "-m", "unetseg.analysis.crossval", *cv_argv],
            "predict": {
                v: ["python", "-m", "unetseg.inference.predict", *a] for v, a in predict_argv.items()
            },
        },
        "config": args.config,
        "train_args": list(train_args),
        "jobs": args.jobs,
        "threads": args.threads,
        "dataset": {
            "root": str(root),
            "cutout": args.cutout,
            "spacing_mm": args.spacing,
            "slab": args.slab,
            "test_ids": test_ids,
        },
        "seconds": watch.seconds | {"total": round(sum(watch.seconds.values()), 2)},
        "cpu_seconds": watch.cpu | {"total": round(sum(watch.cpu.values()), 2)},
        "folds": fold_records(workdir / "cv", args.folds),
        "oof": {k: oof[k] for k in ("num_cases", "per_class", "foreground_mean")},
        "postprocessing": oof["postprocessing"],
        "test": test,
        "machine": machine_info(),
        "load_average_before": before,
        "load_average_after": load_average(),
    }
    from unetseg.evaluation.per_case import json_safe

    (workdir / "study.json").write_text(json.dumps(json_safe(study), indent=1) + "\n")
    (workdir / "study.md").write_text(markdown(study))
    return study


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (module docstring); returns the exit status (2 for a bad option or an existing study)."""
    parser = _parser()
    args, train_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.folds < 2 or args.jobs < 1 or args.threads < 1:
        parser.error(f"--folds {args.folds} (>= 2), --jobs {args.jobs} and --threads {args.threads} (>= 1)")
    try:
        study = run_study(args, train_args)
    except (FileExistsError, real_mri.NilearnMissingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown(study), end="")
    print(f"written: {args.workdir / 'study.json'}, {args.workdir / 'study.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

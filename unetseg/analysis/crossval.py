"""Cross-validation in one command: K ordinary training runs, the out-of-fold evaluation, the postprocessing.

``python -m unetseg.analysis.crossval --config X [--config Y] --data.root D --folds 5 [--jobs N] [--out DIR]
[train.py overrides]`` trains fold ``k`` of ``K`` as ``train.py ... --data.fold k --data.num_folds K`` (the
code path of ``train.py``, through the ablation runner: :mod:`unetseg.analysis.runner`), logging to
``DIR/fold_k/version_0/`` (checkpoints in ``checkpoints/``, the best by ``val/dice`` as ``best-*.ckpt``); a
fold is finished when ``DIR/fold_k/result.json`` exists, and the same command again trains only the
unfinished folds. ``--jobs N`` trains N folds at a time as subprocesses; ``--print_commands`` prints one
command per unfinished fold for a cluster (run the same crossval command afterwards for the evaluation).

When every fold has finished, each fold's validation cases (the data module's ``val`` split of that fold) are
predicted from their files with its best checkpoint and evaluated (:mod:`unetseg.analysis.oof`):
``DIR/oof/per_case.csv``, ``summary.json``, ``summary.md`` and ``DIR/postprocessing.json``. Then
``python -m unetseg.inference.predict --ckpt DIR`` averages the K folds and applies the postprocessing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from unetseg.analysis import runner
from unetseg.analysis.grid import AblationError
from unetseg.analysis.matching import parameter_counts
from unetseg.analysis.oof import Fold, evaluate_out_of_fold
from unetseg.analysis.runs import (
    Run,
    check_finished_runs,
    check_variant,
    read_marker,
    worker_command,
    write_atomic,
)
from unetseg.data import make_splits
from unetseg.data.formats.layout import Case, DatasetSpec
from unetseg.evaluation.per_case import check_tolerance, check_tolerance_names

NAME = "unetseg.analysis.crossval"
PLAN_FILE = "plan.json"
#: Training options the cross-validation sets itself, with what to do instead.
RESERVED: dict[str, str] = {
    "--data.fold": "each fold sets it",
    "--data.num_folds": "use --folds",
    "--logging.save_dir": "the folds log to --out",
    "--logging.name": "the folds are named fold_<k>",
    "--logging.version": "each fold is version_0 of its folder",
    "--trainer.default_root_dir": "each fold's folder is <out>/fold_<k>",
    "--resume": "an unfinished fold starts again from scratch",
    "--print_config": "not a training option",
}


@dataclass
class CrossValidation:
    """A planned cross-validation: the fold runs, the dataset and the validation cases of each fold.

    >>> args = ["--config", "debug", "--data.root", "/data/Task04_Hippocampus"]
    >>> study = plan_crossval(args, 5, Path("runs/cv"))  # doctest: +SKIP
    >>> [run.folder for run in study.runs], [len(cases) for cases in study.val_cases]  # doctest: +SKIP
    (['fold_0', 'fold_1', 'fold_2', 'fold_3', 'fold_4'], [52, 52, 52, 52, 52])
    """

    out_dir: Path
    runs: list[Run]
    spec: DatasetSpec
    val_cases: list[list[Case]]

    def folds(self) -> list[Fold]:
        """Every fold with its best checkpoint (from its ``result.json``); raises naming an unfinished one."""
        folds = []
        for k, (run, cases) in enumerate(zip(self.runs, self.val_cases, strict=True)):
            marker = read_marker(self.out_dir, run.id, run.folder)
            if marker is None or not marker.get("best_model_path"):
                raise AblationError(f"fold {k} has no best checkpoint in {self.out_dir / run.folder}")
            folds.append(Fold(k, Path(marker["best_model_path"]), cases))
        return folds


def _check_train_args(train_args: list[str]) -> None:
    """Raise naming a training option the cross-validation sets itself."""
    for arg in train_args:
        key = arg.split("=", 1)[0]
        if key in RESERVED:
            raise AblationError(f"{key} is set by the cross-validation ({RESERVED[key]})")


def fold_args(train_args: list[str], fold: int, num_folds: int, out_dir: Path) -> list[str]:
    """The training-CLI arguments of fold ``fold``: the W&B group (``out_dir``'s name, overridable), the
    user's arguments, then the fold and its folder ``<out_dir>/fold_<fold>``."""
    name = f"fold_{fold}"
    return [
        "--logging.group", out_dir.name, *train_args,
        "--data.fold", str(fold), "--data.num_folds", str(num_folds),
        "--logging.save_dir", str(out_dir), "--logging.name", name,
        "--trainer.default_root_dir", str(out_dir / name),
    ]  # fmt: skip


def _val_cases(datamodule: Any, what: str) -> tuple[DatasetSpec, list[Case]]:
    """The dataset and the validation cases of a (checked, not set up) data module, split as it splits."""
    if datamodule.root is None:
        raise AblationError(f"{what}: --data.root is required (a cross-validation splits a dataset's cases)")
    spec = datamodule.spec
    splits = make_splits(
        spec,
        datamodule.fold,
        datamodule.num_folds,
        datamodule.split_seed,
        datamodule.split_file,
        datamodule.test_ids,
    )
    return spec, list(splits.val)


def plan_crossval(train_args: list[str], num_folds: int, out_dir: Path) -> CrossValidation:
    """Check every fold's arguments with the training CLI (before anything trains) and plan the runs.

    Raises :class:`~unetseg.analysis.grid.AblationError` for a reserved option, a bad training argument, a
    dataset without ``--data.root`` or folds whose validation cases overlap (a split file without folds).
    """
    _check_train_args(train_args)
    runs: list[Run] = []
    val_cases: list[list[Case]] = []
    seen: dict[str, int] = {}
    spec: DatasetSpec | None = None
    for k in range(num_folds):
        args = fold_args(train_args, k, num_folds, out_dir)
        cli = check_variant(args, f"fold {k}")
        spec, cases = _val_cases(cli.datamodule, f"fold {k}")
        for case in cases:
            if case.case_id in seen:
                raise AblationError(
                    f"case {case.case_id} is a validation case of folds {seen[case.case_id]} and {k}: the "
                    "folds' validation cases must be disjoint (a split file without one split per fold?)"
                )
            seen[case.case_id] = k
        seed = cli.config.get("seed_everything")
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else -1  # -1: not fixed
        values = {"data.fold": k, "data.num_folds": num_folds}
        params = parameter_counts(cli.model.net)
        runs.append(Run(f"fold_{k}", "crossval", seed, values, None, False, args, params, folder=f"fold_{k}"))
        val_cases.append(cases)
        del cli  # keep no model/data/trainer around
    assert spec is not None
    return CrossValidation(out_dir, runs, spec, val_cases)


def save_plan(path: Path, num_folds: int, train_args: list[str], runs: list[Run]) -> None:
    """Write the cross-validation's ``plan.json``: its settings and every fold's exact arguments."""
    data = {"folds": num_folds, "train_args": train_args, "runs": [asdict(r) for r in runs]}
    write_atomic(path, json.dumps(data, indent=1))


def _run_worker(plan_path: Path, run_id: str) -> None:
    """Train the fold ``run_id`` of a saved plan unless it has finished (a ``--jobs`` or cluster worker)."""
    if not plan_path.is_file():
        raise AblationError(f"plan file {plan_path} does not exist (run the cross-validation first)")
    runs = [Run.from_dict(r) for r in json.loads(plan_path.read_text())["runs"]]
    matching = [r for r in runs if r.id == run_id]
    if not matching:
        raise AblationError(f"--run {run_id!r} is not in {plan_path}; runs: {[r.id for r in runs]}")
    if read_marker(plan_path.parent, run_id, matching[0].folder) is None:
        runner.run_one(matching[0], plan_path.parent)


def _default_out(train_args: list[str]) -> Path:
    """``runs/crossval/<name of the last --config>`` (``unet_skip`` without one)."""
    configs = [v for flag, v in zip(train_args, train_args[1:], strict=False) if flag in ("-c", "--config")]
    configs += [a.split("=", 1)[1] for a in train_args if a.startswith("--config=")]
    return Path("runs") / "crossval" / Path(configs[-1] if configs else "unet_skip").stem


def _parser() -> argparse.ArgumentParser:
    """The cross-validation's own options; every other argument goes to the training CLI."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {NAME}",
        description="Train K folds (every other argument goes to train.py: --config, --data.root, ...), then "
        "evaluate the out-of-fold predictions and decide the postprocessing.",
        allow_abbrev=False,
    )
    parser.add_argument("--folds", type=int, default=5, help="number of folds K (default 5)")
    parser.add_argument("--out", help="output folder (default: runs/crossval/<last config name>)")
    parser.add_argument("--jobs", type=int, default=1, help="folds trained at a time (subprocesses when > 1)")
    parser.add_argument("--threads", type=int, help="torch threads per fold (default: CPU count // jobs)")
    parser.add_argument("--print_commands", action="store_true", help="print one command per unfinished fold")
    parser.add_argument(
        "--nsd_tolerance_mm",
        type=_tolerance,
        default=1.0,
        help='NSD tolerance of the evaluation (spacing units, mm for NIfTI): a number or JSON {"class": mm}',
    )
    parser.add_argument(
        "--device", default="auto", help="device of the out-of-fold prediction (auto, cpu, ...)"
    )
    parser.add_argument("--plan", help="plan.json of a cross-validation (with --run: a worker)")
    parser.add_argument("--run", help="train one fold of --plan (fold_<k>)")
    return parser


def _tolerance(text: str) -> float | dict[str, float]:
    """A number or a JSON object (``argparse`` type of ``--nsd_tolerance_mm``; values checked later)."""
    return json.loads(text) if text.lstrip().startswith("{") else float(text)


def main(argv: list[str] | None = None) -> int:
    """Command line (see ``python -m unetseg.analysis.crossval --help``); returns the exit status."""
    parser = _parser()
    options, train_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if options.folds < 2:
        parser.error(f"--folds {options.folds}: must be >= 2")
    if options.jobs < 1 or (options.threads is not None and options.threads < 1):
        parser.error(f"--jobs {options.jobs} / --threads {options.threads}: must be >= 1")
    if bool(options.plan) != bool(options.run):
        parser.error("--plan and --run go together (a worker that trains one fold)")
    if options.plan and train_args:
        parser.error(f"--plan/--run take the training arguments from the plan, not {train_args}")
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        if options.plan:
            _run_worker(Path(options.plan), options.run)
            return 0
        return _crossval(options, train_args)
    except (AblationError, ValueError, FileNotFoundError) as err:
        print(f"{NAME}: error: {err}", file=sys.stderr)
        return 2


def _crossval(options: argparse.Namespace, train_args: list[str]) -> int:
    """Plan, train the unfinished folds (or print their commands), then evaluate out of fold."""
    out_dir = Path(options.out) if options.out else _default_out(train_args)
    check_tolerance(options.nsd_tolerance_mm, "--nsd_tolerance_mm")
    study = plan_crossval(train_args, options.folds, out_dir)
    if isinstance(options.nsd_tolerance_mm, dict):
        check_tolerance_names(options.nsd_tolerance_mm, study.spec.class_names[1:])
    check_finished_runs(study.runs, out_dir)
    plan_path = out_dir / PLAN_FILE
    save_plan(plan_path, options.folds, train_args, study.runs)
    if options.print_commands:
        for run in study.runs:
            if read_marker(out_dir, run.id, run.folder) is None:
                print(shlex.join(worker_command(plan_path, run.id, options.threads or 1, NAME)))
        return 0
    _, failed = runner.execute(study.runs, out_dir, plan_path, options.jobs, options.threads, worker=NAME)
    if failed:
        print(
            f"{NAME}: {len(failed)} fold(s) failed: {failed}; the same command retries them", file=sys.stderr
        )
        return 1
    evaluate_out_of_fold(study.folds(), study.spec, out_dir, options.nsd_tolerance_mm, options.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

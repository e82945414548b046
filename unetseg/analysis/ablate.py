"""Ablation command line: a grid of ordinary training runs over seeds, collected into tables and figures.

``python -m unetseg.analysis.ablate --config configs/ablation/long_skips.yaml`` reads the grid file
(:mod:`unetseg.analysis.grid`, which documents the format), plans the runs and checks every variant with the
training CLI's parser and constructors before anything trains (:mod:`unetseg.analysis.runs`), runs what is not
finished yet, in this process or ``--jobs N`` at a time in subprocesses (:mod:`unetseg.analysis.runner`), and
writes ``results.csv``, ``results.md`` and PNG figures into ``out_dir`` (:mod:`unetseg.analysis.report`).

``<out_dir>/plan.json`` lists each run's exact arguments; ``--print_commands`` prints one command per run for
a cluster (each writes its own results; ``--report_only`` collects them later). An interrupted ablation reruns
only the runs without a ``<out_dir>/runs/<run>/result.json``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from unetseg.analysis import runner
from unetseg.analysis.grid import AblationError, AblationGrid
from unetseg.analysis.report import write_report
from unetseg.analysis.runs import (
    Run,
    check_finished_runs,
    load_plan,
    plan_runs,
    read_marker,
    save_plan,
    worker_command,
)

NAME = "unetseg.analysis.ablate"


def _parser() -> argparse.ArgumentParser:
    """The options of the command line."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {NAME}",
        description="Run an ablation grid of training runs and write results.csv, results.md and figures.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="ablation grid file (YAML), e.g. configs/ablation/long_skips.yaml")
    source.add_argument("--plan", help="plan.json of an ablation (with --run or --report_only)")
    parser.add_argument(
        "--out_dir", help="output folder (default: the grid's out_dir or runs/ablation/<name>)"
    )
    parser.add_argument("--seeds", type=int, help="override the grid's seeds with range(SEEDS)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="add/replace a fixed training argument",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (subprocesses when > 1)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: CPU count // jobs)")
    parser.add_argument(
        "--dry_run", action="store_true", help="check and plan, print the runs, train nothing"
    )
    parser.add_argument("--print_commands", action="store_true", help="print one command per unfinished run")
    parser.add_argument(
        "--report_only", action="store_true", help="collect finished runs and write the report"
    )
    parser.add_argument("--run", help="train one run of --plan (used by --jobs and clusters)")
    return parser


def _plan_from_grid(options: argparse.Namespace) -> tuple[AblationGrid, list[Run], Path, Path]:
    """Check the grid file, plan its runs, write ``plan.json``; ``(grid, runs, out_dir, plan_path)``."""
    grid = AblationGrid.from_file(options.config, options.set, options.seeds)
    out_dir = Path(options.out_dir or grid.out_dir or Path("runs") / "ablation" / grid.name)
    grid.out_dir = str(out_dir)
    runs = plan_runs(grid, out_dir)
    plan_path = out_dir / "plan.json"
    check_finished_runs(runs, out_dir)
    save_plan(plan_path, grid, runs)
    return grid, runs, out_dir, plan_path


def _run_from_plan(runs: list[Run], run_id: str, out_dir: Path, plan_path: Path) -> None:
    """Train the run ``run_id`` of a plan unless it has finished (a worker of ``--jobs`` or a cluster)."""
    matching = [r for r in runs if r.id == run_id]
    if not matching:
        raise AblationError(f"--run {run_id!r} is not in {plan_path}; runs: {[r.id for r in runs]}")
    if read_marker(out_dir, run_id) is None:
        runner.run_one(matching[0], out_dir)


def _print_unfinished(options: argparse.Namespace, runs: list[Run], out_dir: Path, plan_path: Path) -> None:
    """``--print_commands``: one worker command per unfinished run; ``--dry_run``: its training arguments."""
    for run in runs:
        if read_marker(out_dir, run.id) is not None:
            continue
        if options.print_commands:
            print(shlex.join(worker_command(plan_path, run.id, options.threads or 1)))
        else:
            print(f"{run.id}: {run.params.get('total')} params: python train.py {shlex.join(run.args)}")


def main(argv: list[str] | None = None) -> int:
    """Command line (see ``python -m unetseg.analysis.ablate --help``); returns the exit status."""
    parser = _parser()
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if options.jobs < 1:
        parser.error(f"--jobs {options.jobs}: must be >= 1")
    if options.threads is not None and options.threads < 1:
        parser.error(f"--threads {options.threads}: must be >= 1")
    if options.plan and not (options.run or options.report_only):
        parser.error("--plan needs --run or --report_only")
    if options.run and not options.plan:
        parser.error("--run needs --plan (the plan.json of the ablation)")
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        if options.plan:
            plan_path = Path(options.plan)
            grid, runs = load_plan(plan_path)
            out_dir = Path(options.out_dir) if options.out_dir else plan_path.parent
            if options.run:
                _run_from_plan(runs, options.run, out_dir, plan_path)
                return 0
        else:
            grid, runs, out_dir, plan_path = _plan_from_grid(options)
        if options.dry_run or options.print_commands:
            _print_unfinished(options, runs, out_dir, plan_path)
            return 0
        failed: list[str] = []
        start = time.perf_counter()
        if not options.report_only:
            _, failed = runner.execute(runs, out_dir, plan_path, options.jobs, options.threads)
        elapsed = None if options.report_only else time.perf_counter() - start
        print(f"report: {write_report(grid, runs, out_dir, elapsed_s=elapsed, jobs=options.jobs)['md']}")
    except AblationError as err:
        print(f"{NAME}: error: {err}", file=sys.stderr)
        return 2
    if failed:
        print(f"{len(failed)} run(s) failed: {failed}; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Running an ablation's plan: every unfinished run, in this process or as ``--jobs N`` subprocesses.

:func:`run_one` trains and tests one :class:`~unetseg.analysis.runs.Run` through ``unetseg.training.cli.main``
(the code path of ``train.py``) and writes its ``result.json`` (parameters, fit and wall time, best epoch,
validation curve, test metrics, log folder). :func:`execute` skips the finished runs, so an interrupted
ablation reruns only the others; a half-written run folder is removed before its run starts again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from unetseg.analysis.matching import parameter_counts
from unetseg.analysis.runs import Run, marker_path, read_marker, run_folder, worker_command, write_atomic

#: Errors of one run that do not stop the other runs.
RUN_ERRORS = (RuntimeError, ValueError, FloatingPointError, OSError)


def best_epoch(metrics_csv: Path, key: str = "val/dice") -> tuple[int | None, list[dict[str, float]]]:
    """(epoch of the first maximum of ``key``, per-epoch rows ``{"epoch", "val/dice", "val/loss", ...}``)."""
    import pandas as pd

    if not metrics_csv.is_file():
        return None, []
    frame = pd.read_csv(metrics_csv)
    if key not in frame:
        return None, []
    val_cols = [c for c in frame.columns if c.startswith("val/")]
    rows = frame.dropna(subset=[key]).groupby("epoch", as_index=False)[val_cols].last()
    records = [{k: float(v) for k, v in row.items() if v == v} for row in rows.to_dict("records")]
    if not records:
        return None, []
    best = max(records, key=lambda r: (r[key], -r["epoch"]))
    return int(best["epoch"]), records


def run_one(run: Run, out_dir: Path) -> dict[str, Any]:
    """Train and test one run in this process (``unetseg.training.cli.main``) and write its
    ``result.json``."""
    from lightning.pytorch.callbacks import Timer

    from unetseg.training.cli import main

    run_dir = run_folder(out_dir, run.id, run.folder)
    if run_dir.exists():  # an unfinished earlier attempt: start clean
        shutil.rmtree(run_dir)
    start = time.perf_counter()
    result = main(run.args)
    wall = time.perf_counter() - start
    trainer = result.trainer
    if trainer.interrupted or not trainer.state.finished:
        raise RuntimeError(f"run {run.id} did not finish (state {trainer.state.status})")
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
    log_dir = Path(result.log_dir) if result.log_dir else run_dir
    epoch, curve = best_epoch(log_dir / "metrics.csv")
    record = {
        **asdict(run),
        "params": parameter_counts(result.model.net),
        "fit_time_s": _fit_time(timer),
        "wall_time_s": round(wall, 3),
        "epochs": trainer.current_epoch,
        "global_steps": trainer.global_step,
        "best_epoch": epoch,
        "val_curve": curve,
        "test": result.test_metrics,
        "log_dir": str(log_dir),
        "best_model_path": result.best_model_path,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_atomic(marker_path(out_dir, run.id, run.folder), json.dumps(record, indent=1))
    return record


def _fit_time(timer: Any) -> float | None:
    """Seconds from the start to the end of fitting (not ``time_elapsed``: testing the best checkpoint
    restores the timer's state from that checkpoint and adds it as an offset)."""
    if timer is None or timer.start_time("train") is None or timer.end_time("train") is None:
        return None
    return round(timer.end_time("train") - timer.start_time("train"), 3)


def execute(
    runs: Sequence[Run],
    out_dir: Path,
    plan_path: Path,
    jobs: int = 1,
    threads: int | None = None,
    log: Callable[[str], None] = print,
    worker: str = "unetseg.analysis.ablate",
) -> tuple[list[str], list[str]]:
    """Run every unfinished run; returns ``(ran, failed)`` run ids. Finished runs are skipped.

    ``jobs == 1`` trains in this process one run after another; ``jobs > 1`` keeps ``jobs`` subprocesses
    (``python -m <worker> --plan ... --run <id>``) busy, each with ``threads`` torch/OpenMP threads (default:
    CPU count // jobs), logging to ``<out_dir>/logs/<run>.log``.
    """
    todo = [r for r in runs if read_marker(out_dir, r.id, r.folder) is None]
    done = len(runs) - len(todo)
    if done:
        log(f"{done} of {len(runs)} runs already finished; running the other {len(todo)}")
    if jobs <= 1:
        return _run_in_process(todo, out_dir, log)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    return _run_in_subprocesses(todo, out_dir, plan_path, jobs, threads, log, worker)


def _run_in_process(
    todo: Sequence[Run], out_dir: Path, log: Callable[[str], None]
) -> tuple[list[str], list[str]]:
    """One run after another in this process; a failing run is logged and the next one starts."""
    ran: list[str] = []
    failed: list[str] = []
    for i, run in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {run.id}")
        try:
            run_one(run, out_dir)
            ran.append(run.id)
        except RUN_ERRORS as err:
            log(f"run {run.id} failed: {type(err).__name__}: {err}")
            failed.append(run.id)
        except SystemExit as err:  # the CLI's one-line exit (bad data, a diverged run): this run only
            if err.code in (0, None):
                raise
            log(f"run {run.id} failed: exit status {err.code} (its message is above)")
            failed.append(run.id)
    return ran, failed


def _run_in_subprocesses(
    todo: Sequence[Run],
    out_dir: Path,
    plan_path: Path,
    jobs: int,
    threads: int,
    log: Callable[[str], None],
    worker: str,
) -> tuple[list[str], list[str]]:
    """``jobs`` worker processes at a time, each logging to ``<out_dir>/logs/<run>.log``."""
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending = list(todo)
    folders = {run.id: run.folder for run in todo}
    active: dict[str, tuple[subprocess.Popen, IO[str]]] = {}
    ran: list[str] = []
    failed: list[str] = []
    try:
        while pending or active:
            while pending and len(active) < jobs:
                run = pending.pop(0)
                handle = (logs / f"{run.id}.log").open("w")
                log(f"[{len(todo) - len(pending)}/{len(todo)}] {run.id} (subprocess, log {handle.name})")
                command = worker_command(plan_path, run.id, threads, worker)
                proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
                active[run.id] = (proc, handle)
            time.sleep(0.5)
            for run_id, (proc, handle) in list(active.items()):
                if proc.poll() is None:
                    continue
                handle.close()
                del active[run_id]
                if proc.returncode == 0 and read_marker(out_dir, run_id, folders[run_id]) is not None:
                    ran.append(run_id)
                else:
                    log(
                        f"run {run_id} failed (exit status {proc.returncode}); see {logs / (run_id + '.log')}"
                    )
                    failed.append(run_id)
    finally:
        for proc, handle in active.values():
            proc.terminate()
            proc.wait()
            handle.close()
    return ran, failed

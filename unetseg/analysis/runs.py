"""The plan of an ablation: run ids, each run's exact training arguments, ``plan.json`` and the run folders.

:func:`plan_runs` expands an :class:`~unetseg.analysis.grid.AblationGrid` into :class:`Run` objects
(variants x seeds), checks every variant with the training CLI's parser and constructors before anything
trains, and adds the parameter-matched copies. Every run is ``unetseg.training.cli.main(run.args)`` with the
grid values as CLI overrides plus ``--seed_everything <seed>``, ``--logging.save_dir <out_dir>/runs``,
``--logging.name <run>``, ``--logging.group <name>`` and ``--logging.tags [...]`` (W&B groups the runs).

Output folder layout: ``<out_dir>/plan.json`` (the grid and every run's arguments), ``<out_dir>/runs/<run>/``
(the run's logs and checkpoints) and ``<out_dir>/runs/<run>/result.json``, written atomically after the run's
test: a run is finished when that file exists. :func:`worker_command` is the command that trains one run of
a plan (``--jobs N`` subprocesses, or one job per run on a cluster).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unetseg.analysis.grid import AblationError, AblationGrid, format_value, value_label, variant_name
from unetseg.analysis.matching import NetSpec, match_width, parameter_counts

MARKER = "result.json"


@dataclass
class Run:
    """One training run of the ablation: a variant (grid values) and a seed, with its exact CLI arguments.

    ``baseline`` names the variant it is compared with, ``matched`` marks a parameter-matched copy whose
    ``width`` says how its widths were scaled; ``params`` are its parameter counts (``{"total": n, ...}``).
    ``folder`` is the run's folder relative to the output folder (empty: ``runs/<id>``; a cross-validation
    uses ``fold_<k>``).
    """

    id: str
    variant: str
    seed: int
    values: dict[str, Any]
    baseline: str | None
    matched: bool
    args: list[str]
    params: dict[str, int] = field(default_factory=dict)
    width: dict[str, Any] = field(default_factory=dict)
    folder: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Run:
        """The inverse of ``dataclasses.asdict`` (a run of ``plan.json``)."""
        return cls(**data)


@dataclass
class _Variant:
    """A checked variant before it is repeated over the seeds."""

    name: str
    values: dict[str, Any]
    baseline: str | None
    params: dict[str, int]
    matched: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    width: dict[str, Any] = field(default_factory=dict)


def run_args(
    grid: AblationGrid, values: dict[str, Any], seed: int, run_id: str, out_dir: Path, extra: dict[str, Any]
) -> list[str]:
    """The training-CLI arguments of one run."""
    args: list[str] = []
    for config in grid.configs:
        args += ["--config", config]
    for key, value in {**grid.args, **values, **extra}.items():
        args += [f"--{key}", format_value(value)]
    short = grid.short_names()
    tags = ["ablation", grid.name, *(f"{short[k]}={value_label(v)}"[:64] for k, v in values.items())]
    if extra:
        tags.append("matched")
    if grid.gradflow:
        args += ["--trainer.callbacks+=unetseg.analysis.GradientFlow"]
        args += ["--trainer.callbacks.every_n_steps", str(grid.gradflow)]
    # Fit time; interval given explicitly (its default is an Enum that the config cannot store).
    args += [
        "--trainer.callbacks+=lightning.pytorch.callbacks.Timer",
        "--trainer.callbacks.interval",
        "epoch",
    ]
    fixed = {
        "seed_everything": str(seed),
        "test": "true",
        "trainer.default_root_dir": str(out_dir / "runs" / run_id),
        "logging.save_dir": str(out_dir / "runs"),
        "logging.name": run_id,
        "logging.group": grid.name,
        "logging.tags": json.dumps(tags),
    }
    for key, value in fixed.items():
        args += [f"--{key}", value]
    return args


def check_variant(args: list[str], what: str) -> Any:
    """Parse and instantiate (model, data, trainer without loggers) like ``train.py`` would; return the CLI.

    A bad key or value raises :class:`AblationError` with the CLI's own message, before anything trains.
    """
    from unetseg.training.cli import build_cli

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return build_cli([*args, "--trainer.logger", "false"])
    except SystemExit as err:
        text = stderr.getvalue()
        text = text[text.find("error:") :] if "error:" in text else text  # skip warnings before the error
        message = " ".join(text.split()) or f"exit status {err.code}"
        raise AblationError(f"{what} is not a valid training run: {message}") from None
    except Exception as err:  # a constructor raising something else than ValueError
        raise AblationError(f"{what} is not a valid training run: {type(err).__name__}: {err}") from err


def plan_runs(grid: AblationGrid, out_dir: Path, log: Callable[[str], None] = print) -> list[Run]:
    """Expand the grid into runs, check every variant with the training CLI and add parameter-matched copies.

    Raises :class:`AblationError` for the first bad variant, before anything trains.
    """
    short = grid.short_names()
    names = [variant_name(v, short) for v in grid.variants()]
    if len(set(names)) != len(names):
        raise AblationError(
            f"{grid.source}: two variants get the same name; values must differ as text: {names}"
        )
    variants: list[_Variant] = []
    specs: dict[str, NetSpec] = {}
    for values, name in zip(grid.variants(), names, strict=True):
        cli = _checked_cli(grid, out_dir, name, values, {})
        baseline = variant_name({**values, **grid.baseline}, short) if grid.baseline else None
        variants.append(_Variant(name, values, baseline, parameter_counts(cli.model.net)))
        specs[name] = NetSpec.from_cli(cli)
        del cli  # keep no model/data/trainer around (large grids, large nets)
    if grid.param_match:
        totals = {v.name: v.params["total"] for v in variants}
        for variant in list(variants):
            target = totals.get(variant.baseline) if variant.baseline != variant.name else None
            if target is not None and abs(variant.params["total"] - target) > grid.param_tolerance * target:
                variants.append(_matched_copy(grid, out_dir, variant, specs[variant.name], target, log))
    runs = []
    for v in variants:
        for seed in grid.seeds:
            run_id = f"{v.name}-seed{seed}"
            args = run_args(grid, v.values, seed, run_id, out_dir, v.extra)
            runs.append(Run(run_id, v.name, seed, v.values, v.baseline, v.matched, args, v.params, v.width))
    return runs


def _checked_cli(
    grid: AblationGrid, out_dir: Path, name: str, values: dict[str, Any], extra: dict[str, Any]
) -> Any:
    """The training CLI of a variant's first seed, checked by :func:`check_variant`."""
    args = run_args(grid, values, grid.seeds[0], name, out_dir, extra)
    return check_variant(args, f"{grid.source}: variant {name}")


def _matched_copy(
    grid: AblationGrid,
    out_dir: Path,
    variant: _Variant,
    spec: NetSpec,
    target: int,
    log: Callable[[str], None],
) -> _Variant:
    """A copy of ``variant`` with widths scaled to ``target`` parameters, checked with the training CLI."""
    name = variant_name(variant.values, grid.short_names(), matched=True)
    try:
        widths, params, multiplier = match_width(
            spec.builder(), spec.widths or (), target, grid.param_tolerance
        )
    except AblationError as err:
        raise AblationError(f"{grid.source}: variant {variant.name}: {err}") from None
    extra = {f"model.net.init_args.{spec.width_argument}": list(widths)}
    cli = _checked_cli(grid, out_dir, name, variant.values, extra)
    width = {"argument": spec.width_argument, "widths": list(widths), "multiplier": round(multiplier, 4)}
    log(
        f"{name}: {spec.width_argument} {list(spec.widths or ())} -> {list(widths)}: "
        f"{variant.params['total']} -> {params} parameters (target {target})"
    )
    return _Variant(
        name, variant.values, variant.baseline, parameter_counts(cli.model.net), True, extra, width
    )


# --------------------------------------------------------------------------------------------------------
# The output folder: plan.json, result markers, worker commands.


def run_folder(out_dir: Path, run_id: str, folder: str = "") -> Path:
    """The folder of a run: ``<out_dir>/<folder>``, by default ``<out_dir>/runs/<run_id>``."""
    return out_dir / (folder or f"runs/{run_id}")


def marker_path(out_dir: Path, run_id: str, folder: str = "") -> Path:
    """``result.json`` in the run's folder (``<out_dir>/runs/<run_id>/`` by default): exists once the run has
    finished."""
    return run_folder(out_dir, run_id, folder) / MARKER


def read_marker(out_dir: Path, run_id: str, folder: str = "") -> dict[str, Any] | None:
    """The finished run's result, or ``None`` if the run has not finished."""
    path = marker_path(out_dir, run_id, folder)
    return json.loads(path.read_text()) if path.is_file() else None


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and ``os.replace`` so that readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_plan(path: Path, grid: AblationGrid, runs: Sequence[Run]) -> None:
    """Write ``plan.json``: the grid and every run's exact arguments (also the sweep for a cluster)."""
    write_atomic(path, json.dumps({"grid": asdict(grid), "runs": [asdict(r) for r in runs]}, indent=1))


def load_plan(path: Path) -> tuple[AblationGrid, list[Run]]:
    """Read ``plan.json`` written by :func:`save_plan`."""
    if not path.is_file():
        raise AblationError(f"plan file {path} does not exist (run the ablation with --config first)")
    data = json.loads(path.read_text())
    return AblationGrid(**data["grid"]), [Run.from_dict(r) for r in data["runs"]]


def check_finished_runs(runs: Sequence[Run], out_dir: Path) -> None:
    """Raise if a finished run in ``out_dir`` was trained with other arguments than planned now."""
    for run in runs:
        marker = read_marker(out_dir, run.id, run.folder)
        if marker is not None and marker.get("args") != run.args:
            raise AblationError(
                f"{marker_path(out_dir, run.id, run.folder)} was trained with other arguments than planned "
                f"now ({marker.get('args')} vs {run.args}); use another out_dir or delete that run's folder"
            )


def worker_command(
    plan_path: Path, run_id: str, threads: int, module: str = "unetseg.analysis.ablate"
) -> list[str]:
    """The command that trains one run of a plan in its own process (``python -m <module> --plan ...``)."""
    return [
        sys.executable, "-m", module,
        "--plan", str(plan_path), "--run", run_id, "--threads", str(threads),
    ]  # fmt: skip

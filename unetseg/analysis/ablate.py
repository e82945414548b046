"""Ablation runner: a grid of ordinary training runs over seeds, collected into tables and figures.

``python -m unetseg.analysis.ablate --config configs/ablation/long_skips.yaml`` expands the grid file into
runs (variants x seeds), checks every variant with the training CLI's parser and constructors before anything
trains, runs what is not finished yet (in this process, or ``--jobs N`` at a time in subprocesses), and
writes ``results.csv``, ``results.md`` and PNG figures into ``out_dir`` (see :mod:`unetseg.analysis.report`).

Every run is ``unetseg.training.cli.main(args)`` -- the code path of ``train.py`` -- with the grid values as
CLI overrides plus ``--seed_everything <seed>``, ``--logging.save_dir <out_dir>/runs``, ``--logging.name <run>``,
``--logging.group <name>`` and ``--logging.tags [...]`` (W&B groups the runs). ``<out_dir>/plan.json`` lists
each run's exact arguments; ``--print_commands`` prints one command per run for a cluster (each writes its own
results; ``--report_only`` collects them later). A run is finished when ``<out_dir>/runs/<run>/result.json``
exists (written atomically after its test); an interrupted ablation reruns only the other runs.

Grid file (YAML; keys are training-CLI keys without the leading ``--``)::

    name: long_skips                 # W&B group; out_dir defaults to runs/ablation/<name>
    configs: []                      # training configs for every run (overlays on configs/unet_skip.yaml)
    args: {trainer.max_epochs: 12}   # fixed overrides for every run (the budget)
    grid:                            # key -> values; variants are the cartesian product, in this order
      model.net.init_args.long_skip: [concat, add, none]
      model.net.init_args.residual: [false, true]
    seeds: 3                         # or a list of seeds, e.g. [0, 1, 2]
    baseline: {model.net.init_args.long_skip: concat}  # reference of each variant: same other values
    metric: test/dice                # metric of the tables and pairwise comparisons
    param_match: false               # true: add copies of the variants widened to the baseline's parameters
    param_tolerance: 0.02            # relative tolerance of the parameter matching
    gradflow: 10                     # record gradient flow every k steps (null: off)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

GRID_FIELDS = {
    "name": "W&B group and default output folder name",
    "out_dir": "output folder (default runs/ablation/<name>)",
    "configs": "list of training configs applied to every run",
    "args": "mapping of CLI key -> value applied to every run",
    "grid": "mapping of CLI key -> list of values",
    "seeds": "number of seeds or list of seeds",
    "baseline": "mapping of grid key -> value that defines each variant's reference",
    "metric": "metric of the tables (a logged test metric, e.g. test/dice)",
    "param_match": "add parameter-matched copies of the variants (true/false)",
    "param_tolerance": "relative tolerance of the parameter matching",
    "gradflow": "gradient-flow recording interval in steps, or null",
}
#: Keys the runner sets itself; a grid file must not set them.
RESERVED_KEYS = {
    "config": "use the 'configs' list",
    "seed_everything": "use 'seeds'",
    "logging.save_dir": "the runner logs to <out_dir>/runs",
    "logging.name": "the runner names each run",
    "logging.group": "the runner uses 'name' as the W&B group",
    "logging.tags": "the runner tags the runs",
    "trainer.default_root_dir": "the runner sets it per run",
    "test": "the runner always tests the best checkpoint",
    "print_config": "not a training option",
}
MARKER = "result.json"


class AblationError(ValueError):
    """A bad grid file or an inconsistent output folder; the message names the file, key and value."""


@dataclass
class AblationGrid:
    """A parsed and checked grid file (see the module docstring for the format)."""

    name: str
    grid: dict[str, list[Any]]
    configs: list[str] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    baseline: dict[str, Any] = field(default_factory=dict)
    metric: str = "test/dice"
    param_match: bool = False
    param_tolerance: float = 0.02
    gradflow: int | None = 10
    out_dir: str | None = None
    source: str = "<grid>"

    @classmethod
    def from_file(
        cls, path: str | Path, set_args: Sequence[str] = (), seeds: int | None = None
    ) -> AblationGrid:
        """Read and check a grid file; errors name the file and the key.

        ``set_args`` (``KEY=VALUE``, the value parsed as YAML) add to or replace the file's ``args``;
        ``seeds`` replaces its seeds by ``range(seeds)``.
        """
        path = Path(path)
        if not path.is_file():
            raise AblationError(f"ablation grid file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise AblationError(f"{path}: not valid YAML: {err}") from err
        if isinstance(data, dict) and (set_args or seeds is not None):
            data = {**data, "args": dict(data.get("args") or {})}
            for item in set_args:
                key, sep, value = item.partition("=")
                if not sep or not key.strip():
                    raise AblationError(f"--set {item!r}: expected KEY=VALUE, e.g. trainer.max_epochs=4")
                data["args"][key.strip()] = yaml.safe_load(value)
            if seeds is not None:
                data["seeds"] = seeds
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<grid>") -> AblationGrid:
        """Build from a mapping (the YAML content), checking every field."""
        if not isinstance(data, dict):
            raise AblationError(f"{source}: expected a mapping with keys {sorted(GRID_FIELDS)}, got {data!r}")
        unknown = sorted(set(data) - set(GRID_FIELDS))
        if unknown:
            fields = ", ".join(f"{k} ({v})" for k, v in GRID_FIELDS.items())
            raise AblationError(f"{source}: unknown field(s) {unknown}; the fields are: {fields}")
        grid = data.get("grid")
        if not isinstance(grid, dict) or not grid:
            raise AblationError(f"{source}: 'grid' must be a non-empty mapping of CLI key -> list of values")
        grid = {_check_key(source, "grid", k): v for k, v in grid.items()}
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise AblationError(
                    f"{source}: grid key {key!r} must map to a non-empty list, got {values!r}"
                )
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise AblationError(f"{source}: grid key {key!r} repeats a value: {values!r}")
        args = data.get("args") or {}
        if not isinstance(args, dict):
            raise AblationError(f"{source}: 'args' must be a mapping of CLI key -> value, got {args!r}")
        args = {_check_key(source, "args", k): v for k, v in args.items()}
        clash = sorted(set(args) & set(grid))
        if clash:
            raise AblationError(f"{source}: key(s) {clash} are both in 'grid' and in 'args'")
        configs = data.get("configs") or []
        if isinstance(configs, str):
            configs = [configs]
        if not isinstance(configs, list) or not all(isinstance(c, str) for c in configs):
            raise AblationError(f"{source}: 'configs' must be a list of config names/paths, got {configs!r}")
        seeds = data.get("seeds", 3)
        if isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1:
            seeds = list(range(seeds))
        if (
            not isinstance(seeds, list)
            or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            or len(set(seeds)) != len(seeds)
        ):
            raise AblationError(
                f"{source}: 'seeds' must be a positive int or a list of distinct ints, got {seeds!r}"
            )
        baseline = data.get("baseline") or {}
        if not isinstance(baseline, dict):
            raise AblationError(
                f"{source}: 'baseline' must be a mapping of grid key -> value, got {baseline!r}"
            )
        baseline = {k.removeprefix("--"): v for k, v in baseline.items()}
        for key, value in baseline.items():
            if key not in grid:
                raise AblationError(
                    f"{source}: baseline key {key!r} is not a grid key; grid keys: {list(grid)}"
                )
            if value not in grid[key]:
                raise AblationError(
                    f"{source}: baseline {key}={value!r} is not one of the grid's values {grid[key]}"
                )
        param_match = data.get("param_match", False)
        if not isinstance(param_match, bool):
            raise AblationError(f"{source}: 'param_match' must be true or false, got {param_match!r}")
        if param_match and not baseline:
            raise AblationError(
                f"{source}: 'param_match: true' needs a 'baseline' to match the parameters of"
            )
        tolerance = data.get("param_tolerance", 0.02)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
            raise AblationError(f"{source}: 'param_tolerance' must be a number in (0, 1), got {tolerance!r}")
        gradflow = data.get("gradflow", 10)
        if gradflow is not None and (
            isinstance(gradflow, bool) or not isinstance(gradflow, int) or gradflow < 1
        ):
            raise AblationError(
                f"{source}: 'gradflow' must be a positive step interval or null, got {gradflow!r}"
            )
        metric = data.get("metric", "test/dice")
        if not isinstance(metric, str) or not metric.startswith("test/"):
            raise AblationError(
                f"{source}: 'metric' must be a logged test metric such as 'test/dice', got {metric!r}"
            )
        name = data.get("name") or Path(source).stem
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise AblationError(f"{source}: 'name' must be letters, digits, '.', '_' or '-', got {name!r}")
        out_dir = data.get("out_dir")
        if out_dir is not None and not isinstance(out_dir, str):
            raise AblationError(f"{source}: 'out_dir' must be a path, got {out_dir!r}")
        return cls(
            name=name,
            grid=grid,
            configs=configs,
            args=args,
            seeds=seeds,
            baseline=baseline,
            metric=metric,
            param_match=param_match,
            param_tolerance=float(tolerance),
            gradflow=gradflow,
            out_dir=out_dir,
            source=source,
        )

    def short_names(self) -> dict[str, str]:
        """Grid key -> column/label name: the last dotted component, or the full key if that is ambiguous."""
        last = {k: k.rsplit(".", 1)[-1] for k in self.grid}
        counts = {v: list(last.values()).count(v) for v in last.values()}
        return {k: (v if counts[v] == 1 else k) for k, v in last.items()}

    def variants(self) -> list[dict[str, Any]]:
        """The cartesian product of the grid values, first key varying slowest."""
        keys = list(self.grid)
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*self.grid.values())]


def _check_key(source: str, section: str, key: Any) -> str:
    """A CLI key from a grid file, without leading dashes; reserved keys raise naming the alternative."""
    if not isinstance(key, str) or not key.strip("-"):
        raise AblationError(
            f"{source}: {section} key {key!r} must be a CLI key such as model.net.init_args.long_skip"
        )
    key = key.lstrip("-")
    if key in RESERVED_KEYS:
        raise AblationError(f"{source}: {section} key {key!r} is set by the runner ({RESERVED_KEYS[key]})")
    return key


def format_value(value: Any) -> str:
    """A value as a CLI argument string (strings as they are, everything else as JSON, which is YAML)."""
    return value if isinstance(value, str) else json.dumps(value)


def value_label(value: Any) -> str:
    """Short, path-safe text for a value in run names: lists joined by '+', odd characters replaced."""
    if isinstance(value, (list, tuple)):
        text = "+".join(value_label(v) for v in value)
    elif isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, dict):
        text = str(value.get("class_path", json.dumps(value, sort_keys=True))).rsplit(".", 1)[-1]
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


@dataclass
class Run:
    """One training run of the ablation: a variant (grid values) and a seed, with its exact CLI arguments."""

    id: str
    variant: str
    seed: int
    values: dict[str, Any]
    baseline: str | None
    matched: bool
    args: list[str]
    params: dict[str, int] = field(default_factory=dict)
    width: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Run:
        return cls(**data)


def variant_name(values: dict[str, Any], short: dict[str, str], matched: bool = False) -> str:
    """``long_skip=add,residual=false`` (plus ``,matched`` for a parameter-matched copy)."""
    name = ",".join(f"{short[k]}={value_label(v)}" for k, v in values.items())
    return name + (",matched" if matched else "")


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


# --------------------------------------------------------------------------------------------------------
# Checking variants with the training CLI, parameter counts, parameter matching.


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


@dataclass
class NetSpec:
    """How a checked variant's net is built: class, constructor arguments (linked values filled in), the
    argument that sets its width (``width_argument`` class attribute, default ``channels``) and its widths."""

    cls: type[nn.Module]
    init_args: dict[str, Any]
    width_argument: str
    widths: tuple[int, ...] | None

    @classmethod
    def from_cli(cls, cli: Any) -> NetSpec:
        net = cli.model.net
        init_args = cli.config["model"]["net"]["init_args"]
        init_args = dict(init_args.as_dict() if hasattr(init_args, "as_dict") else init_args)
        for linked in ("spatial_dims", "in_channels", "out_channels"):
            if linked in init_args and hasattr(net, linked):
                init_args[linked] = getattr(net, linked)
        width_argument = getattr(type(net), "width_argument", "channels")
        widths = getattr(net, width_argument, None) if width_argument in init_args else None
        return cls(type(net), init_args, width_argument, None if widths is None else tuple(map(int, widths)))

    def builder(self) -> Callable[[Sequence[int]], nn.Module]:
        """``build(widths) -> net``; raises :class:`AblationError` if the net has no width argument."""
        if self.widths is None:
            raise AblationError(
                f"{self.cls.__name__} has no width argument {self.width_argument!r} to match parameters with"
            )
        return lambda widths: self.cls(**{**self.init_args, self.width_argument: list(widths)})


def count_parameters(build: Callable[[Sequence[int]], nn.Module], widths: Sequence[int]) -> int:
    """Parameters of ``build(widths)``, built on the meta device (no memory, milliseconds)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build(widths).parameters())


def match_width(
    build: Callable[[Sequence[int]], nn.Module], widths: Sequence[int], target: int, tolerance: float = 0.02
) -> tuple[tuple[int, ...], int, float]:
    """Widths whose net has ``target`` parameters within ``tolerance`` (relative).

    Bisection on a common multiplier ``m`` (widths ``round(m * w)``), then +-1 channel per level while that
    gets closer. Returns ``(widths, parameters, multiplier)``; raises :class:`AblationError` if the best is
    outside the tolerance.
    """
    widths = tuple(int(w) for w in widths)

    def scaled(m: float) -> tuple[int, ...]:
        return tuple(max(1, round(w * m)) for w in widths)

    cache: dict[tuple[int, ...], int] = {}

    def count(ws: tuple[int, ...]) -> int:
        if ws not in cache:
            cache[ws] = count_parameters(build, ws)
        return cache[ws]

    def error(ws: tuple[int, ...]) -> float:
        return abs(count(ws) - target) / target

    lo, hi = 1.0, 1.0
    while count(scaled(hi)) < target and hi < 64:
        hi *= 2
    while count(scaled(lo)) > target and lo > 1 / 64:
        lo /= 2
    best = min((scaled(lo), scaled(hi), widths), key=error)
    for _ in range(40):
        mid = (lo + hi) / 2
        ws = scaled(mid)
        best = min(best, ws, key=error)
        if count(ws) < target:
            lo = mid
        else:
            hi = mid
    improved = True
    while improved and error(best) > 0:
        improved = False
        for i in range(len(best)):
            for step in (-1, 1):
                candidate = tuple(w + step if j == i else w for j, w in enumerate(best))
                if candidate[i] >= 1 and error(candidate) < error(best):
                    best, improved = candidate, True
    if error(best) > tolerance:
        raise AblationError(
            f"could not match {target} parameters within {tolerance:.1%}: best widths {list(best)} have "
            f"{count(best)} ({error(best):+.1%}); raise param_tolerance or use wider nets"
        )
    multiplier = sum(best) / sum(widths)
    return best, count(best), multiplier


def plan_runs(grid: AblationGrid, out_dir: Path, log: Callable[[str], None] = print) -> list[Run]:
    """Expand the grid into runs, check every variant with the training CLI and add parameter-matched copies.

    Raises :class:`AblationError` for the first bad variant, before anything trains.
    """
    short = grid.short_names()
    variants = grid.variants()
    names = [variant_name(v, short) for v in variants]
    if len(set(names)) != len(names):
        raise AblationError(
            f"{grid.source}: two variants get the same name; values must differ as text: {names}"
        )
    checked: dict[str, tuple[dict[str, Any], dict[str, int], NetSpec]] = {}
    for values, name in zip(variants, names, strict=True):
        args = run_args(grid, values, grid.seeds[0], name, out_dir, {})
        cli = check_variant(args, f"{grid.source}: variant {name}")
        checked[name] = (values, _parameter_counts(cli.model.net), NetSpec.from_cli(cli))
        del cli  # keep no model/data/trainer around (large grids, large nets)

    def baseline_of(values: dict[str, Any]) -> str | None:
        return variant_name({**values, **grid.baseline}, short) if grid.baseline else None

    entries: list[
        tuple[str, dict[str, Any], str | None, bool, dict[str, Any], dict[str, int], dict[str, Any]]
    ] = []
    for name, (values, counts, _) in checked.items():
        entries.append((name, values, baseline_of(values), False, {}, counts, {}))
    if grid.param_match:
        for name, (values, counts, spec) in checked.items():
            base = baseline_of(values)
            if base is None or base == name:
                continue
            target = checked[base][1]["total"]
            own = counts["total"]
            if abs(own - target) <= grid.param_tolerance * target:
                continue
            width_argument, widths = spec.width_argument, spec.widths
            try:
                new_widths, params, multiplier = match_width(
                    spec.builder(), widths or (), target, grid.param_tolerance
                )
            except AblationError as err:
                raise AblationError(f"{grid.source}: variant {name}: {err}") from None
            key = f"model.net.init_args.{width_argument}"
            matched_name = variant_name(values, short, matched=True)
            args = run_args(grid, values, grid.seeds[0], matched_name, out_dir, {key: list(new_widths)})
            matched_cli = check_variant(args, f"{grid.source}: variant {matched_name}")
            counts = _parameter_counts(matched_cli.model.net)
            width = {
                "argument": width_argument,
                "widths": list(new_widths),
                "multiplier": round(multiplier, 4),
            }
            entries.append((matched_name, values, base, True, {key: list(new_widths)}, counts, width))
            log(
                f"{matched_name}: {width_argument} {list(widths)} -> {list(new_widths)}: "
                f"{own} -> {params} parameters (target {target})"
            )
    runs = []
    for name, values, base, matched, extra, counts, width in entries:
        for seed in grid.seeds:
            run_id = f"{name}-seed{seed}"
            args = run_args(grid, values, seed, run_id, out_dir, extra)
            runs.append(Run(run_id, name, seed, values, base, matched, args, counts, width))
    return runs


def _parameter_counts(net: nn.Module) -> dict[str, int]:
    """``net.parameter_counts()`` when the net has it, else ``{"total": n}``."""
    counts = getattr(net, "parameter_counts", None)
    return dict(counts()) if callable(counts) else {"total": sum(p.numel() for p in net.parameters())}


# --------------------------------------------------------------------------------------------------------
# Running.


def marker_path(out_dir: Path, run_id: str) -> Path:
    return out_dir / "runs" / run_id / MARKER


def read_marker(out_dir: Path, run_id: str) -> dict[str, Any] | None:
    """The finished run's result, or ``None`` if the run has not finished."""
    path = marker_path(out_dir, run_id)
    return json.loads(path.read_text()) if path.is_file() else None


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and ``os.replace`` so that readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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

    run_dir = out_dir / "runs" / run.id
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
        "params": _parameter_counts(result.model.net),
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
    _write_atomic(marker_path(out_dir, run.id), json.dumps(record, indent=1))
    return record


def _fit_time(timer: Any) -> float | None:
    """Seconds from the start to the end of fitting (not ``time_elapsed``: testing the best checkpoint
    restores the timer's state from that checkpoint and adds it as an offset)."""
    if timer is None or timer.start_time("train") is None or timer.end_time("train") is None:
        return None
    return round(timer.end_time("train") - timer.start_time("train"), 3)


def _worker_command(plan_path: Path, run_id: str, threads: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "unetseg.analysis.ablate",
        "--plan",
        str(plan_path),
        "--run",
        run_id,
        "--threads",
        str(threads),
    ]


def execute(
    runs: Sequence[Run],
    out_dir: Path,
    plan_path: Path,
    jobs: int = 1,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[str], list[str]]:
    """Run every unfinished run; returns ``(ran, failed)`` run ids. Finished runs are skipped.

    ``jobs == 1`` trains in this process one run after another; ``jobs > 1`` keeps ``jobs`` subprocesses
    (``python -m unetseg.analysis.ablate --plan ... --run <id>``) busy, each with ``threads`` torch/OpenMP
    threads (default: CPU count // jobs), logging to ``<out_dir>/logs/<run>.log``.
    """
    todo = [r for r in runs if read_marker(out_dir, r.id) is None]
    done = len(runs) - len(todo)
    if done:
        log(f"{done} of {len(runs)} runs already finished; running the other {len(todo)}")
    ran: list[str] = []
    failed: list[str] = []
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    if jobs <= 1:
        for i, run in enumerate(todo, 1):
            log(f"[{i}/{len(todo)}] {run.id}")
            try:
                run_one(run, out_dir)
                ran.append(run.id)
            except (RuntimeError, ValueError, FloatingPointError, OSError) as err:
                log(f"run {run.id} failed: {type(err).__name__}: {err}")
                failed.append(run.id)
        return ran, failed
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending = list(todo)
    active: dict[str, tuple[subprocess.Popen, Any]] = {}
    try:
        while pending or active:
            while pending and len(active) < jobs:
                run = pending.pop(0)
                handle = (logs / f"{run.id}.log").open("w")
                log(f"[{len(todo) - len(pending)}/{len(todo)}] {run.id} (subprocess, log {handle.name})")
                proc = subprocess.Popen(
                    _worker_command(plan_path, run.id, threads),
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
                active[run.id] = (proc, handle)
            time.sleep(0.5)
            for run_id, (proc, handle) in list(active.items()):
                if proc.poll() is None:
                    continue
                handle.close()
                del active[run_id]
                if proc.returncode == 0 and read_marker(out_dir, run_id) is not None:
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


# --------------------------------------------------------------------------------------------------------
# Plan file and command line.


def save_plan(path: Path, grid: AblationGrid, runs: Sequence[Run]) -> None:
    """Write ``plan.json``: the grid and every run's exact arguments (also the sweep for a cluster)."""
    _write_atomic(path, json.dumps({"grid": asdict(grid), "runs": [asdict(r) for r in runs]}, indent=1))


def load_plan(path: Path) -> tuple[AblationGrid, list[Run]]:
    """Read ``plan.json`` written by :func:`save_plan`."""
    if not path.is_file():
        raise AblationError(f"plan file {path} does not exist (run the ablation with --config first)")
    data = json.loads(path.read_text())
    return AblationGrid(**data["grid"]), [Run.from_dict(r) for r in data["runs"]]


def check_finished_runs(runs: Sequence[Run], out_dir: Path) -> None:
    """Raise if a finished run in ``out_dir`` was trained with other arguments than planned now."""
    for run in runs:
        marker = read_marker(out_dir, run.id)
        if marker is not None and marker.get("args") != run.args:
            raise AblationError(
                f"{marker_path(out_dir, run.id)} was trained with other arguments than the grid gives now "
                f"({marker.get('args')} vs {run.args}); use another out_dir or delete that run's folder"
            )


def main(argv: list[str] | None = None) -> int:
    """Command line (see ``python -m unetseg.analysis.ablate --help``); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m unetseg.analysis.ablate",
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
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if options.jobs < 1:
        parser.error(f"--jobs {options.jobs}: must be >= 1")
    if options.threads is not None:
        if options.threads < 1:
            parser.error(f"--threads {options.threads}: must be >= 1")
        torch.set_num_threads(options.threads)
    try:
        if options.plan:
            plan_path = Path(options.plan)
            grid, runs = load_plan(plan_path)
            out_dir = Path(options.out_dir) if options.out_dir else plan_path.parent
            if options.run:
                matching = [r for r in runs if r.id == options.run]
                if not matching:
                    raise AblationError(
                        f"--run {options.run!r} is not in {plan_path}; runs: {[r.id for r in runs]}"
                    )
                if read_marker(out_dir, options.run) is None:
                    run_one(matching[0], out_dir)
                return 0
            if not options.report_only:
                parser.error("--plan needs --run or --report_only")
        else:
            if options.run:
                parser.error("--run needs --plan (the plan.json of the ablation)")
            grid = AblationGrid.from_file(options.config, options.set, options.seeds)
            out_dir = Path(options.out_dir or grid.out_dir or Path("runs") / "ablation" / grid.name)
            grid.out_dir = str(out_dir)
            runs = plan_runs(grid, out_dir)
            plan_path = out_dir / "plan.json"
            check_finished_runs(runs, out_dir)
            save_plan(plan_path, grid, runs)
        from unetseg.analysis.report import write_report

        if options.dry_run or options.print_commands:
            for run in runs:
                if read_marker(out_dir, run.id) is not None:
                    continue
                if options.print_commands:
                    print(shlex.join(_worker_command(plan_path, run.id, options.threads or 1)))
                else:
                    print(
                        f"{run.id}: {run.params.get('total')} params: python train.py {shlex.join(run.args)}"
                    )
            return 0
        failed: list[str] = []
        start = time.perf_counter()
        if not options.report_only:
            _, failed = execute(runs, out_dir, plan_path, options.jobs, options.threads)
        elapsed = time.perf_counter() - start
        paths = write_report(
            grid, runs, out_dir, elapsed_s=None if options.report_only else elapsed, jobs=options.jobs
        )
        print(f"report: {paths['md']}")
        if failed:
            print(
                f"{len(failed)} run(s) failed: {failed}; rerun the same command to retry them",
                file=sys.stderr,
            )
            return 1
        return 0
    except AblationError as err:
        print(f"unetseg.analysis.ablate: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

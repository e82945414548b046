"""Ablation grid files: parsing, validation, and the expansion into variants x seeds.

Grid file (YAML; keys are training-CLI keys without the leading ``--``)::

    name: long_skips                 # W&B group; out_dir defaults to runs/ablation/<name>
    configs: []                      # training configs for every run (overlays on configs/unet_skip.yaml)
    args: {trainer.max_epochs: 12}   # fixed overrides for every run (the budget)
    grid:                            # key -> values; variants are the cartesian product, in this order
      model.net.init_args.long_skip: [concat, add, none]
      model.net.init_args.block: [plain, residual]
    seeds: 3                         # or a list of seeds, e.g. [0, 1, 2]
    baseline: {model.net.init_args.long_skip: concat}  # reference of each variant: same other values
    metric: test/dice                # metric of the tables and pairwise comparisons
    param_match: false               # true: add copies of the variants widened to the baseline's parameters
    param_tolerance: 0.02            # relative tolerance of the parameter matching
    gradflow: 10                     # record gradient flow every k steps (null: off)

Every error is an :class:`AblationError` naming the file, the key and the bad value.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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


def _is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


#: Single-value fields: field -> (default, check, what a valid value is).
SCALAR_FIELDS: dict[str, tuple[Any, Callable[[Any], bool], str]] = {
    "param_match": (False, lambda v: isinstance(v, bool), "true or false"),
    "param_tolerance": (
        0.02,
        lambda v: (_is_int(v) or isinstance(v, float)) and 0 < v < 1,
        "a number in (0, 1)",
    ),
    "gradflow": (10, lambda v: v is None or (_is_int(v) and v >= 1), "a positive step interval or null"),
    "metric": (
        "test/dice",
        lambda v: isinstance(v, str) and v.startswith("test/"),
        "a logged test metric such as 'test/dice'",
    ),
    "out_dir": (None, lambda v: v is None or isinstance(v, str), "a path"),
}
NAME_PATTERN = r"[A-Za-z0-9._-]+"


class AblationError(ValueError):
    """A bad grid file or an inconsistent output folder; the message names the file, key and value."""


@dataclass
class AblationGrid:
    """A parsed and checked grid file (see the module docstring for the format).

    >>> data = {"grid": {"model.net.init_args.long_skip": ["concat", "none"]}}
    >>> grid = AblationGrid.from_dict(data, source="a.yml")
    >>> grid.name, [variant_name(v, grid.short_names()) for v in grid.variants()], grid.seeds
    ('a', ['long_skip=concat', 'long_skip=none'], [0, 1, 2])
    """

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
        grid = _check_grid(source, data.get("grid"))
        args = _check_args(source, data.get("args") or {}, grid)
        configs = _check_configs(source, data.get("configs") or [])
        seeds = _check_seeds(source, data.get("seeds", 3))
        baseline = _check_baseline(source, data.get("baseline") or {}, grid)
        scalars = {key: _check_scalar(source, key, data) for key in SCALAR_FIELDS}
        if scalars["param_match"] and not baseline:
            raise AblationError(
                f"{source}: 'param_match: true' needs a 'baseline' to match the parameters of"
            )
        scalars["param_tolerance"] = float(scalars["param_tolerance"])
        name = data.get("name") or Path(source).stem
        if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
            raise AblationError(f"{source}: 'name' must be letters, digits, '.', '_' or '-', got {name!r}")
        return cls(name, grid, configs, args, seeds, baseline, **scalars, source=source)

    def short_names(self) -> dict[str, str]:
        """Grid key -> column/label name: the last dotted component, or the full key if that is ambiguous."""
        last = {k: k.rsplit(".", 1)[-1] for k in self.grid}
        counts = {v: list(last.values()).count(v) for v in last.values()}
        return {k: (v if counts[v] == 1 else k) for k, v in last.items()}

    def variants(self) -> list[dict[str, Any]]:
        """The cartesian product of the grid values, first key varying slowest."""
        keys = list(self.grid)
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*self.grid.values())]


def _check_scalar(source: str, key: str, data: dict[str, Any]) -> Any:
    """The value of a single-value field (``SCALAR_FIELDS``), or its default."""
    default, valid, what = SCALAR_FIELDS[key]
    value = data.get(key, default)
    if not valid(value):
        raise AblationError(f"{source}: {key!r} must be {what}, got {value!r}")
    return value


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


def _check_grid(source: str, grid: Any) -> dict[str, list[Any]]:
    """The ``grid`` mapping: CLI keys to non-empty lists of distinct values."""
    if not isinstance(grid, dict) or not grid:
        raise AblationError(f"{source}: 'grid' must be a non-empty mapping of CLI key -> list of values")
    grid = {_check_key(source, "grid", k): v for k, v in grid.items()}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise AblationError(f"{source}: grid key {key!r} must map to a non-empty list, got {values!r}")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise AblationError(f"{source}: grid key {key!r} repeats a value: {values!r}")
    return grid


def _check_args(source: str, args: Any, grid: dict[str, list[Any]]) -> dict[str, Any]:
    """The fixed ``args`` mapping: CLI keys that are not also grid keys."""
    if not isinstance(args, dict):
        raise AblationError(f"{source}: 'args' must be a mapping of CLI key -> value, got {args!r}")
    args = {_check_key(source, "args", k): v for k, v in args.items()}
    clash = sorted(set(args) & set(grid))
    if clash:
        raise AblationError(f"{source}: key(s) {clash} are both in 'grid' and in 'args'")
    return args


def _check_configs(source: str, configs: Any) -> list[str]:
    """The ``configs`` list (a single string is a list of one)."""
    configs = [configs] if isinstance(configs, str) else configs
    if not isinstance(configs, list) or not all(isinstance(c, str) for c in configs):
        raise AblationError(f"{source}: 'configs' must be a list of config names/paths, got {configs!r}")
    return configs


def _check_seeds(source: str, seeds: Any) -> list[int]:
    """The ``seeds``: a positive count ``n`` (seeds ``0..n-1``) or a list of distinct ints."""
    seeds = list(range(seeds)) if _is_int(seeds) and seeds >= 1 else seeds
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(map(_is_int, seeds))
        or len(set(seeds)) < len(seeds)
    ):
        raise AblationError(
            f"{source}: 'seeds' must be a positive int or a list of distinct ints, got {seeds!r}"
        )
    return seeds


def _check_baseline(source: str, baseline: Any, grid: dict[str, list[Any]]) -> dict[str, Any]:
    """The ``baseline`` mapping: grid keys to one of their grid values."""
    if not isinstance(baseline, dict):
        raise AblationError(f"{source}: 'baseline' must be a mapping of grid key -> value, got {baseline!r}")
    baseline = {k.removeprefix("--"): v for k, v in baseline.items()}
    for key, value in baseline.items():
        if key not in grid:
            raise AblationError(f"{source}: baseline key {key!r} is not a grid key; grid keys: {list(grid)}")
        if value not in grid[key]:
            raise AblationError(
                f"{source}: baseline {key}={value!r} is not one of the grid's values {grid[key]}"
            )
    return baseline


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


def variant_name(values: dict[str, Any], short: dict[str, str], matched: bool = False) -> str:
    """``long_skip=add,block=residual`` (plus ``,matched`` for a parameter-matched copy)."""
    name = ",".join(f"{short[k]}={value_label(v)}" for k, v in values.items())
    return name + (",matched" if matched else "")

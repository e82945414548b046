"""Grid files: every shipped grid file parses and plans (each variant checked by the training CLI)."""

from __future__ import annotations

import os

import pytest

from unetseg.analysis.grid import AblationError, AblationGrid
from unetseg.analysis.runs import plan_runs
from unetseg.nets.encoders import smp_available
from unetseg.training.cli import REPO_CONFIGS

GRID_FILES = sorted((REPO_CONFIGS / "ablation").glob("*.yaml"))


@pytest.mark.parametrize("path", GRID_FILES, ids=[p.stem for p in GRID_FILES])
def test_shipped_grid_files_are_valid(path, tmp_path):
    if "EncoderUNet" in path.read_text() and not (smp_available() or os.environ.get("UNETSEG_REQUIRE_SMP")):
        pytest.skip("needs the [smp] extra")
    grid = AblationGrid.from_file(path)
    if "auto" in grid.configs:  # planned from a dataset given with --set data.root=...: a real-MRI cut-out
        real_mri = pytest.importorskip("benchmarks.real_mri")
        root = real_mri.build_cutout(tmp_path / "mri")
        grid.args.update({"data.root": str(root), "data.split_file": str(root / "splits.json")})
    runs = plan_runs(grid, tmp_path, log=lambda _: None)
    assert len(runs) >= len(grid.variants()) * len(grid.seeds)
    assert len({r.id for r in runs}) == len(runs)


GRID = {"grid": {"model.net.init_args.long_skip": ["concat", "none"]}}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"param_match": "yes"}, r"'param_match' must be true or false, got 'yes'"),
        ({"param_tolerance": 1.5}, r"'param_tolerance' must be a number in \(0, 1\), got 1.5"),
        ({"param_tolerance": True}, r"'param_tolerance' must be a number in \(0, 1\), got True"),
        ({"gradflow": 0}, r"'gradflow' must be a positive step interval or null, got 0"),
        (
            {"metric": "val/dice"},
            r"'metric' must be a logged test metric such as 'test/dice', got 'val/dice'",
        ),
        ({"out_dir": 3}, r"'out_dir' must be a path, got 3"),
        ({"name": "a b"}, r"'name' must be letters, digits, '.', '_' or '-', got 'a b'"),
        ({"seeds": [1, 1]}, r"'seeds' must be a positive int or a list of distinct ints, got \[1, 1\]"),
        ({"configs": [1]}, r"'configs' must be a list of config names/paths, got \[1\]"),
        (
            {"args": {"model.net.init_args.long_skip": "add"}},
            r"key\(s\) \['model.net.init_args.long_skip'\] are both in 'grid' and in 'args'",
        ),
        ({"param_match": True}, r"'param_match: true' needs a 'baseline'"),
    ],
)
def test_each_field_is_checked_naming_the_source_key_and_value(fields, message):
    with pytest.raises(AblationError, match=r"^grid.yaml: " + message):
        AblationGrid.from_dict({**GRID, **fields}, source="grid.yaml")


def test_defaults_and_normalised_values():
    grid = AblationGrid.from_dict(
        {**GRID, "configs": "debug", "seeds": 2, "baseline": {"--model.net.init_args.long_skip": "none"}},
        source="configs/ablation/x.yaml",
    )
    assert (grid.name, grid.configs, grid.seeds, grid.metric) == ("x", ["debug"], [0, 1], "test/dice")
    assert (grid.param_match, grid.param_tolerance, grid.gradflow, grid.out_dir) == (False, 0.02, 10, None)
    assert grid.baseline == {"model.net.init_args.long_skip": "none"}

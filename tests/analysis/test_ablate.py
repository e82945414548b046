"""Ablation command line: one row per run, resume after an interruption, early errors, parameter-matched
plans, parallel subprocesses."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

import unetseg.analysis.ablate as ablate
from unetseg.analysis import runner
from unetseg.analysis.runs import load_plan
from unetseg.nets import UNet

DEBUG_CHANNELS = (4, 8, 16)  # configs/debug.yaml
NUM_CLASSES = 4  # the built-in synthetic data: background, organ, lesion, vessel
FAST = {
    "trainer.max_epochs": 1,
    "trainer.enable_progress_bar": False,
    "trainer.enable_model_summary": False,
}


def write_grid(path: Path, **fields) -> Path:
    content = {
        "name": "tiny",
        "configs": ["debug"],
        "args": dict(FAST),
        "grid": {"model.net.init_args.long_skip": ["concat", "none"]},
        "seeds": 2,
        "baseline": {"model.net.init_args.long_skip": "concat"},
        "gradflow": 1,
        **fields,
    }
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


RUN_ONE = runner.run_one


class Spy:
    """Wraps ``runner.run_one``: records the run ids, optionally interrupts before the n-th run."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.ran: list[str] = []
        self.interrupt_at = interrupt_at

    def __call__(self, run, out_dir):
        if self.interrupt_at is not None and len(self.ran) + 1 == self.interrupt_at:
            raise KeyboardInterrupt
        self.ran.append(run.id)
        return RUN_ONE(run, out_dir)


def test_tiny_grid_tables_and_resume(tmp_path, monkeypatch):
    grid = write_grid(tmp_path / "tiny.yaml")
    out = tmp_path / "out"
    args = ["--config", str(grid), "--out_dir", str(out), "--threads", "1"]
    all_runs = [f"long_skip={m}-seed{s}" for m in ("concat", "none") for s in (0, 1)]

    # 1. stopped (Ctrl-C) while starting the third run: two runs finished
    spy = Spy(interrupt_at=3)
    monkeypatch.setattr(runner, "run_one", spy)
    with pytest.raises(KeyboardInterrupt):
        ablate.main(args)
    assert spy.ran == all_runs[:2]
    assert sorted(p.parent.name for p in out.glob("runs/*/result.json")) == all_runs[:2]

    # 2. the same command again runs only the two missing runs
    spy = Spy()
    monkeypatch.setattr(runner, "run_one", spy)
    assert ablate.main(args) == 0
    assert spy.ran == all_runs[2:]

    frame = pd.read_csv(out / "results.csv")
    assert list(zip(frame["variant"], frame["seed"], strict=True)) == [
        ("long_skip=concat", 0), ("long_skip=concat", 1), ("long_skip=none", 0), ("long_skip=none", 1),
    ]  # fmt: skip
    assert list(frame["long_skip"]) == ["concat", "concat", "none", "none"]
    metrics = ["test/dice", "test/iou"] + [
        f"test/{m}/{c}" for m in ("dice", "iou") for c in ("organ", "vessel")
    ]
    for col in metrics:
        assert frame[col].map(lambda v: math.isfinite(v) and 0 <= v <= 1).all(), col
    assert (frame["test/loss"] > 0).all()
    assert ((frame["fit_time_s"] > 0) & (frame["fit_time_s"] < frame["wall_time_s"])).all()
    assert (frame["best_epoch"] == 0).all()  # one epoch
    for mode in ("concat", "none"):
        expected = UNet(channels=DEBUG_CHANNELS, out_channels=NUM_CLASSES, long_skip=mode).parameter_counts()
        row = frame[frame["long_skip"] == mode].iloc[0]
        assert {part: row[f"params_{part}"] for part in expected} == expected

    md = (out / "results.md").read_text()
    results, pairwise = md.split("## Pairwise comparisons")
    table = [line for line in results.splitlines() if line.startswith("| `long_skip=")]
    assert len(table) == 2 and "| baseline |" in table[0] and "| 2 |" in table[1]
    assert "| `long_skip=concat` | `long_skip=none` | 2 |" in pairwise
    assert "| 95% CI of A − B |" in pairwise and "seeds for 80% power" in pairwise
    (row,) = [line for line in pairwise.splitlines() if line.startswith("| `long_skip=concat` |")]
    assert len(row.strip("|").split(" | ")) == 8
    assert "Ordering by mean" in md
    for png in ("metric_by_variant.png", "val_curves.png", "gradflow.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"({png})" in md

    # 3. a run whose result is lost is rerun from scratch, the others are kept as they are
    markers = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    (out / "runs" / "long_skip=none-seed1" / "result.json").unlink()
    spy = Spy()
    monkeypatch.setattr(runner, "run_one", spy)
    assert ablate.main(args) == 0
    assert spy.ran == ["long_skip=none-seed1"]
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    assert {k: v for k, v in after.items() if k != "long_skip=none-seed1"} == {
        k: v for k, v in markers.items() if k != "long_skip=none-seed1"
    }
    assert [p.name for p in (out / "runs" / "long_skip=none-seed1").glob("version_*")] == ["version_0"]
    assert len(pd.read_csv(out / "results.csv")) == 4

    # 4. changing the settings of finished runs is refused (another out_dir is needed)
    assert ablate.main([*args, "--set", "trainer.max_epochs=2"]) == 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"grid": {"model.net.init_args.long_skip": ["concat"], "model.net.init_args.colour": ["red"]}},
            r"variant long_skip=concat,colour=red is not a valid training run.*colour",
        ),
        (
            {"grid": {"model.net.init_args.long_skip": ["concat", "cat"]}},
            r"variant long_skip=cat is not a valid training run.*'cat'.*\['add', 'concat', 'none'\]",
        ),
        ({"grids": {}}, r"unknown field\(s\) \['grids'\]"),
        ({"grid": {"seed_everything": [1, 2]}}, r"grid key 'seed_everything' is set by the runner.*seeds"),
        (
            {"baseline": {"model.net.init_args.long_skip": "add"}},
            r"baseline .*'add' is not one of the grid's",
        ),
        ({"seeds": 0}, r"'seeds' must be a positive int"),
        ({"grid": {"model.net.init_args.long_skip": []}}, r"must map to a non-empty list"),
    ],
)
def test_bad_grid_files_fail_before_any_run(tmp_path, capsys, fields, message):
    grid = write_grid(tmp_path / "bad.yaml", **fields)
    out = tmp_path / "out"
    assert ablate.main(["--config", str(grid), "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(grid) in err
    assert re.search(message, err, flags=re.S), err
    assert not (out / "runs").exists()


def test_plan_with_per_level_values_and_parameter_matched_copies(tmp_path):
    grid = write_grid(
        tmp_path / "plan.yaml",
        grid={"model.net.init_args.long_skip": ["concat", ["none", "concat"], "none"]},
        param_match=True,
        param_tolerance=0.05,
        seeds=[3],
    )
    out = tmp_path / "out"
    assert ablate.main(["--config", str(grid), "--out_dir", str(out), "--dry_run"]) == 0
    _, runs = load_plan(out / "plan.json")
    by_variant = {r.variant: r for r in runs}
    target = UNet(channels=DEBUG_CHANNELS, out_channels=NUM_CLASSES).parameter_counts()["total"]
    own = {
        name: UNet(channels=DEBUG_CHANNELS, out_channels=NUM_CLASSES, long_skip=mode).parameter_counts()[
            "total"
        ]
        for name, mode in [("none+concat", ["none", "concat"]), ("none", "none")]
    }
    # the variants more than 5% away from concat's parameter count get a matched copy
    needs_matching = [
        f"long_skip={name},matched" for name, n in own.items() if abs(n - target) > 0.05 * target
    ]
    assert "long_skip=none,matched" in needs_matching
    assert list(by_variant) == [
        "long_skip=concat",
        "long_skip=none+concat",
        "long_skip=none",
        *needs_matching,
    ]
    assert len(runs) == len(by_variant)  # one seed
    per_level = by_variant["long_skip=none+concat"]
    i = per_level.args.index("--model.net.init_args.long_skip")
    assert yaml.safe_load(per_level.args[i + 1]) == ["none", "concat"]
    assert per_level.args[per_level.args.index("--seed_everything") + 1] == "3"
    assert by_variant["long_skip=concat"].params["total"] == target
    for name in needs_matching:
        run = by_variant[name]
        assert run.matched and run.baseline == "long_skip=concat"
        assert abs(run.params["total"] - target) <= 0.05 * target
        widths = run.width["widths"]
        assert run.args[run.args.index("--model.net.init_args.channels") + 1] == str(widths)
        net = UNet(
            channels=widths, out_channels=NUM_CLASSES, long_skip=run.values["model.net.init_args.long_skip"]
        )
        assert net.parameter_counts()["total"] == run.params["total"]
    assert not (out / "runs").exists()  # a dry run trains nothing


@pytest.mark.slow
def test_jobs_run_in_parallel_subprocesses(tmp_path):
    grid = write_grid(tmp_path / "tiny.yaml", gradflow=None)
    out = tmp_path / "out"
    assert ablate.main(["--config", str(grid), "--out_dir", str(out), "--jobs", "2"]) == 0
    frame = pd.read_csv(out / "results.csv")
    assert len(frame) == 4 and frame["test/dice"].between(0, 1).all()
    assert sorted(p.name for p in (out / "logs").glob("*.log")) == sorted(f"{r}.log" for r in frame["run"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--plan", "plan.json"], "--plan needs --run or --report_only"),
        (["--config", "grid.yaml", "--run", "x"], "--run needs --plan"),
        (["--config", "grid.yaml", "--jobs", "0"], "--jobs 0: must be >= 1"),
    ],
)
def test_inconsistent_options_are_refused_before_reading_files(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        ablate.main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err

"""The deep-supervision ablation grid: long_skip x deep_supervision x 3 seeds, each deep-supervised variant
compared with the same long skip without it, and the heads counted in its parameters."""

from __future__ import annotations

from unetseg.analysis.grid import AblationGrid
from unetseg.analysis.runs import plan_runs
from unetseg.training.cli import REPO_CONFIGS

NUM_CLASSES = 4  # the built-in synthetic data
BASE_CHANNELS = (16, 32, 64, 128)  # configs/unet_skip.yaml: decoder levels 0, 1, 2; level 1 gets a head


def test_grid_expands_to_skip_modes_times_deep_supervision_times_seeds(tmp_path):
    grid = AblationGrid.from_file(REPO_CONFIGS / "ablation" / "deep_supervision.yaml")
    runs = plan_runs(grid, tmp_path, log=lambda _: None)
    variants = [
        f"long_skip={m},deep_supervision={d}" for m in ("concat", "add", "none") for d in ("false", "true")
    ]
    assert list(dict.fromkeys(r.variant for r in runs)) == variants
    assert len(runs) == 18 and len({r.id for r in runs}) == 18
    assert sorted({r.seed for r in runs}) == [0, 1, 2]
    params = {r.variant: r.params for r in runs}
    for run in runs:
        mode, deep = (
            run.values["model.net.init_args.long_skip"],
            run.values["model.net.init_args.deep_supervision"],
        )
        assert run.baseline == f"long_skip={mode},deep_supervision=false"
        flag = run.args.index("--model.net.init_args.deep_supervision")
        assert run.args[flag + 1] == ("true" if deep else "false")
        if deep:
            heads = BASE_CHANNELS[1] * NUM_CLASSES + NUM_CLASSES
            assert run.params["ds_heads"] == heads
            assert run.params["total"] == params[run.baseline]["total"] + heads
        else:
            assert "ds_heads" not in run.params

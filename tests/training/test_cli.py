"""The training CLI, called as a function: every config runs, W&B gets the metrics, bad input exits 2."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import yaml

from tests import _wandb
from unetseg.training.cli import REPO_CONFIGS, main, resolve_config

CONFIGS = sorted(p.relative_to(REPO_CONFIGS).as_posix() for p in REPO_CONFIGS.rglob("*.yaml")
                 if p.parent.name not in ("datasets", "sweeps", "ablation"))  # data.root / a sweep / a grid


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_runs_through_the_cli_with_fast_dev_run(config, run_args):
    result = main(["--config", config, "--trainer.fast_dev_run", "1", *run_args])
    assert result.trainer.state.finished
    assert 0.0 <= result.test_metrics["test/dice"] <= 1.0


def test_overlays_change_only_the_skip_mode():
    base = yaml.safe_load((REPO_CONFIGS / "unet_skip.yaml").read_text())
    assert base["model"]["net"]["init_args"]["long_skip"] == "concat"
    for name, mode in [("unet_add.yaml", "add"), ("unet_noskip.yaml", "none")]:
        overlay = yaml.safe_load((REPO_CONFIGS / name).read_text())
        assert overlay == {"model": {"net": {"init_args": {"long_skip": mode}}}}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config", "unet_add"], "add"),
        (["--config", "unet_noskip.yaml"], "none"),
        (["--config", str(REPO_CONFIGS / "unet_skip.yaml")], "concat"),
        (["--model.net.init_args.long_skip", "add"], "add"),
        (
            ["--config", "unet_add", "--model.net.init_args.long_skip", "[none, concat, add]"],
            ["none", "concat", "add"],
        ),
    ],
)
def test_print_config_shows_the_resolved_skip_mode(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"])
    assert exit_.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    net = printed["model"]["net"]["init_args"]
    assert net["long_skip"] == expected
    assert net["channels"] == [16, 32, 64, 128]  # from the base config underneath every overlay


def test_data_properties_are_linked_into_the_model(run_args):
    result = main(
        [
            "--config",
            "debug",
            "--data.spatial_dims",
            "3",
            "--data.spatial_size",
            "16",
            "--trainer.fast_dev_run",
            "1",
            *run_args,
        ]
    )
    net, data = result.model.net, result.datamodule
    assert net.out_channels == data.num_classes == len(result.model.class_names)
    assert net.spatial_dims == 3 and net.in_channels == data.in_channels
    assert result.model.class_names == list(data.class_names)


def test_one_epoch_run_logs_dice_and_iou_to_offline_wandb_and_csv(tmp_path, run_args):
    result = main(["--config", "debug", "--logging.wandb", "true", "--trainer.max_epochs", "2", *run_args])
    run_dir = _wandb.offline_run(tmp_path / "runs")
    rows = _wandb.history(run_dir)
    val = [r for r in rows if "val/dice" in r]
    assert len(val) == 2 and all(0 <= r["val/dice"] <= 1 and 0 <= r["val/iou"] <= 1 for r in val)
    assert {"val/dice/organ", "val/dice/lesion", "val/dice/vessel", "train/loss"} <= set().union(*rows)
    assert any("test/dice" in r for r in rows)
    # the CSV log records the same numbers
    csv_path = Path(result.log_dir) / "metrics.csv"
    with csv_path.open() as f:
        csv_val = [float(r["val/dice"]) for r in csv.DictReader(f) if r.get("val/dice")]
    assert csv_val == pytest.approx([r["val/dice"] for r in val])
    assert result.val_metrics["val/dice"] == pytest.approx(val[-1]["val/dice"])
    # the resolved config and parameter counts are in the W&B run and next to the checkpoints
    saved = yaml.safe_load((run_dir / "files" / "config.yaml").read_text())
    assert saved["model"]["net"]["init_args"]["long_skip"] == "concat"
    assert (Path(result.log_dir) / "config.yaml").is_file()
    assert (
        Path(result.best_model_path).is_file() and Path(result.best_model_path).parent.name == "checkpoints"
    )
    assert (Path(result.best_model_path).parent / "last.ckpt").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.net.init_args.long_skip", "cat"], r"long_skip.*'cat'.*\['add', 'concat', 'none'\]"),
        (["--model.net.init_args.long_skip", "[add, add, add]"], r"long_skip has 3 entries.*needs 2"),
        (["--model.net.init_args.norm", "layer"], r"'layer'.*batch"),
        (["--model.loss", "dyce"], r"loss='dyce' is not one of"),
        (["--model.net.init_args.colour", "red"], r"colour"),
        (["--trainer.max_epocs", "3"], r"max_epocs"),
        (["--config", "no_such_config"], r"config 'no_such_config' not found.*available: \[.*unet_add.yaml"),
    ],
)
def test_bad_configs_exit_2_naming_the_key_or_value(args, message, run_args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "debug", *args, *run_args])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err, flags=re.S | re.I)


def test_resolve_config_accepts_names_with_and_without_suffix():
    assert resolve_config("unet_add") == resolve_config("unet_add.yaml")
    assert Path(resolve_config("unet_add")).parent == REPO_CONFIGS

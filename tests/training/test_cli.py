"""The training CLI, called as a function: every config runs, W&B gets the metrics, bad input exits 2; configs
compose on the base exactly once, --help is short and true, a time budget ends the fit."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import _wandb
from unetseg.training.cli import REPO_CONFIGS, build_cli, main, resolve_config

REPO = Path(__file__).resolve().parents[2]
LIGHTNING_ARGS_WARNING = "args parameter is intended to run from within Python"

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
        (["--config", "long_skips"], r"'long_skips' is ambiguous.*'ablation/long_skips.yaml', 'sweeps/long_"),
        (["--model.scheduler", "linear"], r"scheduler='linear' is not one of \['constant', 'cosine', 'poly"),
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


@pytest.mark.parametrize(
    ("configs", "applied", "long_skip"),
    [
        (["unet_skip.yaml"], ["unet_skip", "debug"], "concat"),
        (["unet_add", "unet_skip"], ["unet_skip", "unet_add", "debug"], "add"),
        (["unet_add", str(REPO_CONFIGS / "unet_skip.yaml")], ["unet_skip", "unet_add", "debug"], "add"),
    ],
)
def test_the_base_config_comes_first_exactly_once_whatever_the_order(configs, applied, long_skip, run_args):
    args = [a for name in [*configs, "debug"] for a in ("--config", name)]
    cli = build_cli([*args, "--trainer.logger", "false", *run_args])
    assert [Path(str(p)).stem for p in cli.config.config] == applied
    assert set(cli.model.net.long_skip) == {long_skip}


def test_a_bare_name_is_found_anywhere_in_the_configs_tree(capsys):
    assert resolve_config("ddp") == str(REPO_CONFIGS / "cluster" / "ddp.yaml")
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "ddp", "--print_config"])
    assert exit_.value.code in (None, 0)
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"] == "ddp"


def test_configs_in_the_working_folder_come_before_the_shipped_ones(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "unet_add.yaml").write_text("model: {net: {init_args: {long_skip: none}}}\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_config("unet_add") == str(tmp_path / "configs" / "unet_add.yaml")
    assert resolve_config("unet_noskip") == str(REPO_CONFIGS / "unet_noskip.yaml")
    cli = build_cli(["--config", "unet_add", "--config", "debug", "--trainer.logger", "false"])
    assert [Path(str(p)).parent for p in cli.config.config][0] == REPO_CONFIGS  # the base: shipped
    assert set(cli.model.net.long_skip) == {"none"}


def test_no_lightning_args_warning_from_a_shell_or_from_python(recwarn, capsys):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "offline"}
    shell = subprocess.run(
        [sys.executable, "train.py", "--config", "debug", "--print_config"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert shell.returncode == 0, shell.stderr[-2000:]
    assert LIGHTNING_ARGS_WARNING not in shell.stderr and "long_skip: concat" in shell.stdout
    assert len(sys.argv) > 1  # what made Lightning warn when main() is given args
    with pytest.raises(SystemExit):
        main(["--config", "debug", "--print_config"])
    assert not [w for w in recwarn if LIGHTNING_ARGS_WARNING in str(w.message)]
    assert LIGHTNING_ARGS_WARNING not in capsys.readouterr().err


def test_help_lists_the_keys_and_the_nets_not_every_torch_module(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    head, _, options = out.partition("options:")
    assert "--model.net.help unetseg.UNet" in head  # said before the option list
    keys = ("--model.net NET", "--model.scheduler", "--model.loss", "--data.batch_size", "--trainer.max_time",
            "--logging.wandb", "--performance.memory_format", "--resume")
    for key in keys:
        assert key in options, key
    net_help = options[options.index("--model.net NET"):options.index("--model.loss")]
    assert "unetseg.UNet" in net_help and "unetseg.nets.EncoderUNet" in net_help
    assert "torch.nn.Linear" not in out and "torch.nn.ReLU" not in out and out.count("\n") < 1000
    assert "--ckpt_path" not in out and "--model.lr_schedule" not in out


def test_net_help_lists_the_unet_keys(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--model.net.help", "unetseg.UNet"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for key in ("long_skip", "block", "channels", "norm", "upsample", "dropout"):
        assert f"--model.net.{key} " in out, key
    assert "--model.net.residual" not in out


def test_max_time_ends_the_fit_in_time_and_the_schedule_spans_it(run_args, capsys):
    """max_epochs -1 (no step estimate): the fit stops on the 4 s budget, the cosine LR decays over it."""
    result = main(
        ["--config", "debug", "--trainer.max_time", "00:00:00:04", "--trainer.max_epochs", "-1",
         "--trainer.enable_progress_bar", "false", *run_args]
    )
    assert result.trainer.state.finished and result.fit_seconds < 4 + 10  # a step and a validation may follow
    assert result.steps == result.trainer.global_step > 0
    schedule = result.trainer.lr_scheduler_configs[0].scheduler
    assert schedule.get_last_lr()[0] < 0.05 * schedule.base_lrs[0]  # cosine at t close to 1
    assert Path(result.best_model_path).is_file() and 0 <= result.test_metrics["test/dice"] <= 1
    assert re.search(rf"unetseg: trained {result.steps} steps in \d+\.\d s", capsys.readouterr().err)

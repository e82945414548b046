"""Resume with one flag, SIGKILL at a random step, SLURM requeue on SIGUSR1, and atomic checkpoint saves.

Training processes are real (``python train.py`` in its own session) and are killed the way a cluster kills
them; the resumed runs go through ``unetseg.training.cli.main``.
"""

from __future__ import annotations

import csv
import os
import random
import re
import signal
import stat
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests import _wandb
from tests._procs import TrainProcess, sbatch_train_args, train_env
from unetseg.training.checkpointing import (
    AtomicCheckpointIO,
    newest_checkpoint,
    remove_stale_temporaries,
    resolve_resume,
)
from unetseg.training.cli import main
from unetseg.training.loggers import WANDB_ID_FILE

STEPS_PER_EPOCH = 2  # configs/debug.yaml: 8 training images, batch size 4
SCHEDULER = [
    "--model.scheduler.class_path", "torch.optim.lr_scheduler.StepLR",
    "--model.scheduler.init_args.step_size", "1", "--model.scheduler.init_args.gamma", "0.5",
]


def _args(save_dir: Path, *extra: str) -> list[str]:
    return ["--config", "debug", "--logging.wandb", "true", "--test", "false",
            "--logging.save_dir", str(save_dir), "--trainer.default_root_dir", str(save_dir), *extra]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _val_epochs(run_dir: Path) -> list[int]:
    with (run_dir / "metrics.csv").open() as f:
        return [int(r["epoch"]) for r in csv.DictReader(f) if r.get("val/dice")]


def _wandb_ids(save_dir: Path) -> list[str]:
    """Run id of each offline run folder, from its ``run-<id>.wandb`` file (folder names may get a suffix)."""
    files = sorted((save_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    return [f.stem.removeprefix("run-") for f in files]


def test_resume_last_continues_epoch_optimizer_scheduler_csv_and_wandb(tmp_path):
    first = main(_args(tmp_path, "--trainer.max_epochs", "2", *SCHEDULER))
    last = Path(first.log_dir) / "checkpoints" / "last.ckpt"
    assert _load(last)["global_step"] == 2 * STEPS_PER_EPOCH

    resumed = main(_args(tmp_path, "--trainer.max_epochs", "3", *SCHEDULER, "--resume", "last"))
    assert resumed.resumed_from == str(last) and resumed.log_dir == first.log_dir
    state = _load(last)  # rewritten by the resumed run
    assert state["epoch"] == 2 and state["global_step"] == 3 * STEPS_PER_EPOCH
    adam = state["optimizer_states"][0]
    assert {int(s["step"]) for s in adam["state"].values()} == {3 * STEPS_PER_EPOCH}  # not restarted at 0
    assert state["lr_schedulers"][0]["last_epoch"] == 3
    assert adam["param_groups"][0]["lr"] == pytest.approx(0.003 * 0.5**3)
    run_dir = Path(first.log_dir)
    assert sorted(set(_val_epochs(run_dir))) == [0, 1, 2]  # one CSV, continued
    assert [p.name for p in run_dir.parent.iterdir()] == ["version_0"]
    ids = _wandb_ids(tmp_path)
    assert len(ids) == 2 and set(ids) == {(run_dir / WANDB_ID_FILE).read_text().strip()}
    second = _wandb.history(_wandb.finished(sorted((tmp_path / "wandb").glob("offline-run-*"))[-1]))
    assert max(r["epoch"] for r in second if "val/dice" in r) == 2


def test_resume_auto_starts_a_named_run_then_continues_it(tmp_path):
    args = _args(tmp_path, "--logging.version", "job-7", "--resume", "auto", "--logging.wandb", "false")
    fresh = main([*args, "--trainer.max_epochs", "1"])
    assert fresh.resumed_from is None and Path(fresh.log_dir).name == "job-7"
    again = main([*args, "--trainer.max_epochs", "2"])
    assert again.resumed_from == str(Path(fresh.log_dir) / "checkpoints" / "last.ckpt")
    assert again.trainer.global_step == 2 * STEPS_PER_EPOCH and _val_epochs(Path(fresh.log_dir))[-1] == 1


def test_resume_from_a_checkpoint_file_outside_a_run_folder_starts_a_new_folder(tmp_path):
    no_wandb = ("--logging.wandb", "false")
    first = main(_args(tmp_path, "--trainer.max_epochs", "1", *no_wandb))
    loose = tmp_path / "shared" / "model.ckpt"
    loose.parent.mkdir()
    loose.write_bytes((Path(first.log_dir) / "checkpoints" / "last.ckpt").read_bytes())
    again = main(_args(tmp_path, "--trainer.max_epochs", "2", *no_wandb, "--resume", str(loose)))
    assert again.resumed_from == str(loose) and Path(again.log_dir).name == "version_1"
    assert again.trainer.global_step == 2 * STEPS_PER_EPOCH


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--resume", "last"], r"--resume last: no run of 'debug' with a checkpoint under .*debug"),
        (["--resume", "auto"], r"--resume auto needs a fixed run folder: set --logging.version"),
        (["--resume", "no/such/run"], r"'no/such/run': no such run folder or checkpoint; expected 'last'"),
        (["--ckpt_path", "x.ckpt"], r"ckpt_path"),  # one way to resume: --resume
    ],
)
def test_bad_resume_exits_2_with_a_clear_message(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(_args(tmp_path, *extra))
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_resume_of_a_folder_without_checkpoint_names_what_it_looked_for(tmp_path):
    (tmp_path / "debug" / "version_0").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no checkpoint in that folder \(looked for checkpoints/last"):
        resolve_resume(str(tmp_path / "debug" / "version_0"), str(tmp_path), "debug")


def test_newest_checkpoint_prefers_the_latest_of_last_and_hpc(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    last, hpc = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    (tmp_path / "checkpoints" / "best-epoch001.ckpt").write_bytes(b"x")
    for path, mtime in ((last, 100), (hpc, 200)):
        path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
    assert newest_checkpoint(tmp_path) == hpc
    os.utime(last, (300, 300))
    assert newest_checkpoint(tmp_path) == last


def _all_checkpoints_load(root: Path) -> list[Path]:
    found = sorted(root.rglob("*.ckpt"))
    for path in found:
        state = _load(path)  # raises on a truncated or half-written file
        assert {"state_dict", "global_step", "optimizer_states"} <= set(state), path
    return found


def test_sigkill_at_a_random_step_then_resume_finishes(tmp_path):
    epochs = 25
    delay = random.uniform(0.0, 1.5)
    args = _args(tmp_path / "runs", "--trainer.max_epochs", str(epochs))
    last = tmp_path / "runs" / "debug" / "version_0" / "checkpoints" / "last.ckpt"
    with TrainProcess(args, cwd=tmp_path, log_dir=tmp_path / "logs") as proc:
        proc.wait_for(last.exists, timeout=120, what="first checkpoint")
        time.sleep(delay)
        assert proc.proc.poll() is None, f"the run finished within {delay:.2f} s: nothing to kill"
        proc.signal_group(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    assert _all_checkpoints_load(tmp_path / "runs"), f"no checkpoint after a kill at +{delay:.2f} s"
    killed_at = _load(newest_checkpoint(last.parent.parent))["global_step"]
    assert 0 < killed_at < epochs * STEPS_PER_EPOCH

    resumed = main([*args, "--resume", "last"])
    assert resumed.resumed_from and Path(resumed.log_dir) == last.parent.parent
    assert resumed.trainer.current_epoch == epochs and resumed.trainer.global_step == epochs * STEPS_PER_EPOCH
    assert sorted(set(_val_epochs(last.parent.parent))) == list(range(epochs))
    assert len(set(_wandb_ids(tmp_path / "runs"))) == 1 and len(_wandb_ids(tmp_path / "runs")) == 2
    _all_checkpoints_load(tmp_path / "runs")


def _save_forever(path: Path, i: int) -> None:
    """Child process: save ever-newer ~24 MB checkpoints (numbered after ``i``) to ``path`` until killed."""
    io = AtomicCheckpointIO()
    while True:
        i += 1
        io.save_checkpoint({"i": i, "w": torch.full((6_000_000,), float(i))}, path)


def test_checkpoint_saves_are_atomic_under_repeated_sigkill(tmp_path, monkeypatch):
    """Kill a process that keeps overwriting ``last.ckpt``: the file is always a complete checkpoint.

    The temporary-file folder is put on another filesystem when one exists (/dev/shm, tmpfs), as on clusters
    (node-local /tmp, runs on NFS): Lightning's own save moves its temporary file from there, a copy over the
    old checkpoint that a kill can cut short (this test fails with it); AtomicCheckpointIO never uses it.
    """
    other_fs = Path("/dev/shm")
    if other_fs.is_dir() and os.stat(other_fs).st_dev != os.stat(tmp_path).st_dev:
        monkeypatch.setattr(tempfile, "tempdir", str(other_fs))  # inherited by the forked saver
    temp_before = set(Path(tempfile.gettempdir()).iterdir())
    target = tmp_path / "checkpoints" / "last.ckpt"
    rng, stale, previous = random.Random(), 0, 0
    try:
        for _ in range(8):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                try:
                    _save_forever(target, previous)
                finally:
                    os._exit(1)
            wait_until = time.monotonic() + 10
            while not target.exists() and time.monotonic() < wait_until:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.05, 0.4))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            state = torch.load(target, weights_only=True)  # a truncated file raises here
            assert state["i"] >= previous  # the newest complete save (or the previous one)
            assert torch.equal(state["w"], torch.full((6_000_000,), float(state["i"])))
            previous = state["i"]
            leftovers = remove_stale_temporaries(target.parent)
            assert len(leftovers) <= 1 and all(p.name.startswith(".last.ckpt.") for p in leftovers)
            stale += len(leftovers)
            assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    finally:
        leaked = set(Path(tempfile.gettempdir()).iterdir()) - temp_before
        for path in leaked:
            if path.is_file() and path.name.startswith("tmp"):
                path.unlink()
    assert not leaked, f"temporary files left in {tempfile.gettempdir()}: {sorted(leaked)}"
    assert stale >= 1, "no kill landed during a save: the test did not exercise the critical window"
    assert stat.S_IMODE(target.stat().st_mode) & 0o044  # normal permissions, not mkstemp's 0600


SLURM_ENV = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "unetseg", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
    "SLURM_NODELIST": "localhost", "SLURM_CPUS_PER_TASK": "1",
}


def test_slurm_requeue_signal_saves_requeues_and_the_requeued_job_resumes_the_same_run(tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    requeued = tmp_path / "scontrol.log"
    scontrol = fake_bin / "scontrol"
    # like SLURM, `scontrol requeue` ends the job: nothing the job does after the signal can count
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> "{requeued}"\nkill -9 $PPID\n')
    scontrol.chmod(0o755)
    env = {**SLURM_ENV, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    # the template's own arguments (--logging.version slurm-$SLURM_JOB_ID --resume auto ...), CPU-sized
    cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
           "--trainer.strategy", "auto", "--trainer.sync_batchnorm", "false", "--trainer.precision", "32",
           "--logging.wandb", "true", "--test", "false", "--logging.save_dir", str(tmp_path / "runs")]
    args = [*sbatch_train_args({**SLURM_ENV, "CONFIG": "debug"}), *cpu]
    run_dir = tmp_path / "runs" / "debug" / "slurm-4242"
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    with TrainProcess([*args, "--trainer.max_epochs", "500"], cwd=tmp_path, log_dir=tmp_path / "logs",
                      env=train_env(**env)) as proc:
        proc.wait_for((run_dir / "checkpoints" / "last.ckpt").exists, timeout=120, what="first checkpoint")
        os.kill(proc.proc.pid, signal.SIGUSR1)  # what `#SBATCH --signal=SIGUSR1@90` sends
        assert proc.wait(timeout=60) == -signal.SIGKILL  # killed by scontrol, after the requeue checkpoint
        proc.signal_group(signal.SIGKILL)  # the W&B service
        assert "Handling auto-requeue signal" in proc.stderr and hpc.exists()
    assert requeued.read_text().split() == ["requeue", "4242"]
    saved = _load(hpc)
    assert saved["global_step"] > 0

    # the requeued job: same script, same SLURM_JOB_ID, so the same run folder
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    resumed = main([*args, "--trainer.max_epochs", str(saved["epoch"] + 2)])
    assert resumed.resumed_from == str(hpc) and Path(resumed.log_dir) == run_dir
    assert resumed.trainer.global_step > saved["global_step"]
    assert resumed.trainer.current_epoch == saved["epoch"] + 2
    ids = _wandb_ids(tmp_path / "runs")
    assert len(ids) == 2 and set(ids) == {(run_dir / WANDB_ID_FILE).read_text().strip()}
    assert not (tmp_path / "hpc_ckpt_1.ckpt").exists()  # Lightning's default_root_dir is the run folder

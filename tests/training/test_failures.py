"""Every failure a user can cause, through the real CLI: the exit status, one line on stderr naming what to
fix (no traceback), and what is left on disk (no empty run folder; checkpoints and ``save_top_k`` intact).

Bad values and files exit with status 2; SIGTERM (a scheduler's preemption or time limit) saves ``last.ckpt``
and exits with 143, and ``--resume last`` continues there to the end.
"""

from __future__ import annotations

import csv
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._datafiles import make_msd, volume_image, volume_label, write_nifti
from tests._procs import TrainProcess
from tests.data.test_bad_data import _error_line
from tests.data.test_datamodule_real import FEW_STEPS, SMALL
from unetseg import UNet
from unetseg.training.checkpointing import AtomicCheckpointIO
from unetseg.training.cli import main
from unetseg.training.module import NonFiniteLossError, SegmentationModule

STEPS_PER_EPOCH = 2  # configs/debug.yaml: 8 training images, batch size 4


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--config", "debug", "--test", "false", "--logging.save_dir", str(tmp_path / "runs"),
            "--trainer.default_root_dir", str(tmp_path), *extra]


def _exit(args: list[str], capsys) -> tuple[int, str]:
    """Run the CLI, which must exit; its status and its one ``unetseg: error:`` line."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    return exit_.value.code, _error_line(capsys.readouterr().err)


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _bests(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("best-*.ckpt"))


# --- SIGTERM -----------------------------------------------------------------------------------------------


def test_sigterm_saves_last_ckpt_exits_143_and_resume_last_finishes(tmp_path):
    epochs = 25
    args = _args(tmp_path, "--trainer.max_epochs", str(epochs))
    run_dir = tmp_path / "runs" / "debug" / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"
    with TrainProcess(args, cwd=tmp_path, log_dir=tmp_path / "logs") as proc:
        proc.wait_for(last.exists, timeout=120, what="first checkpoint")
        proc.signal_group(signal.SIGTERM)  # what a scheduler sends on preemption or at the time limit
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        stderr = proc.stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("unetseg: ")]
    assert len(lines) == 1, stderr[-3000:]
    stopped = re.fullmatch(
        r"unetseg: stopped by SIGTERM at epoch (\d+), step (\d+); saved (\S+): to continue, run the same "
        r"command with --resume last",
        lines[0],
    )
    assert stopped and Path(stopped[3]) == last, lines[0]
    state = _load(last)
    step = int(stopped[2])
    assert state["global_step"] == step and 0 < step < epochs * STEPS_PER_EPOCH
    assert state["epoch"] == int(stopped[1])

    resumed = main([*args, "--resume", "last"])
    assert resumed.resumed_from == str(last) and Path(resumed.log_dir) == run_dir
    assert resumed.trainer.current_epoch == epochs and resumed.trainer.global_step == epochs * STEPS_PER_EPOCH
    assert len(_bests(run_dir)) == 1 and _load(last)["global_step"] == epochs * STEPS_PER_EPOCH


# --- values out of range -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.optimizer.init_args.lr", "-0.1"],
         r"model\.optimizer\.init_args\.lr is out of range \(Invalid learning rate: -0\.1\): give lr >= 0"),
        (["--model.optimizer.init_args.weight_decay", "-1"],
         r"model\.optimizer\.init_args\.weight_decay is out of range .*: give weight_decay >= 0"),
        (["--trainer.max_epochs", "-5"],
         r"trainer\.max_epochs=-5 is out of range: give a number of epochs >= 0, or -1 for no limit"),
    ],
)
def test_values_out_of_range_exit_2_naming_the_key_before_any_run_folder(extra, message, tmp_path, capsys):
    code, line = _exit(_args(tmp_path, *extra), capsys)
    assert code == 2 and re.search(message, line), line
    assert not (tmp_path / "runs").exists()


# --- bad data found in setup -------------------------------------------------------------------------------


def _label_with_9(root: Path) -> tuple[Path, str]:
    label = volume_label(SMALL)
    label[0, 0, 0] = 9
    path = write_nifti(root / "labelsTr" / "case_001.nii.gz", label)
    return path, "has values [9] outside the declared labels"


def _truncated_image(root: Path) -> tuple[Path, str]:
    path = root / "imagesTr" / "case_001.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, "cannot read"


def _nan_image(root: Path) -> tuple[Path, str]:
    image = volume_image(volume_label(SMALL), seed=1)
    image[2, 2, 2] = np.nan
    return write_nifti(root / "imagesTr" / "case_001.nii.gz", image), "contains NaN or infinite values"


@pytest.mark.parametrize(
    ("spoil", "wandb"),
    [(_label_with_9, "false"), (_truncated_image, "false"), (_nan_image, "false"), (_label_with_9, "true")],
)
def test_bad_data_found_in_setup_exits_2_and_leaves_no_run_folder(spoil, wandb, tmp_path, capsys):
    root = make_msd(tmp_path / "msd", n_cases=4, shape=SMALL)
    bad, words = spoil(root)
    args = _args(tmp_path, "--data.root", str(root), "--data.num_folds", "2", "--logging.wandb", wandb,
                 *FEW_STEPS)
    code, line = _exit(args, capsys)
    assert code == 2 and str(bad) in line and words in line, line
    assert not (tmp_path / "runs").exists()  # made by this run, removed with the empty run folder

    earlier = tmp_path / "runs" / "debug" / "version_0"  # another run's folder: kept, no version_1 left
    earlier.mkdir(parents=True)
    (earlier / "notes.txt").write_text("kept")
    code, _ = _exit(args, capsys)
    assert code == 2
    assert _files(tmp_path / "runs") == ["debug", "debug/version_0", "debug/version_0/notes.txt"]


# --- a kill between the best and the last checkpoint -------------------------------------------------------


def _record_saves(monkeypatch, folder: Path) -> list[tuple[Path, Path]]:
    """Copy every checkpoint the CLI saves to ``folder`` (numbered); returns the (path, copy) list."""
    saves: list[tuple[Path, Path]] = []
    save = AtomicCheckpointIO.save_checkpoint

    def save_and_copy(io, checkpoint, path, storage_options=None):
        save(io, checkpoint, path, storage_options)
        copy = folder / f"{len(saves):03d}-{Path(path).name}"
        folder.mkdir(exist_ok=True)
        shutil.copy2(path, copy)
        saves.append((Path(path), copy))

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save_and_copy)
    return saves


def _val_dice(run_dir: Path) -> list[float]:
    with (run_dir / "metrics.csv").open() as f:
        return [float(r["val/dice"]) for r in csv.DictReader(f) if r.get("val/dice")]


@pytest.mark.parametrize("previous_best_deleted", [True, False])
def test_a_kill_between_best_and_last_checkpoint_leaves_one_best_after_resume(
    previous_best_deleted, tmp_path, monkeypatch
):
    """The folder a SIGKILL leaves right after a new best checkpoint is saved (before or after the previous
    best is deleted) and before ``last.ckpt`` is: rebuilt from the files a real run saved, then resumed."""
    epochs = 5
    args = _args(tmp_path, "--trainer.max_epochs", str(epochs), "--model.optimizer.init_args.lr", "0.03")
    saves = _record_saves(monkeypatch, tmp_path / "saved")
    run_dir = Path(main(args).log_dir)
    monkeypatch.undo()
    bests = [i for i, (path, _) in enumerate(saves) if path.name.startswith("best-")]
    assert len(bests) > 1, f"val/dice never improved after the first epoch: {_val_dice(run_dir)}"
    kill = bests[-1]
    last_before = max(i for i, (path, _) in enumerate(saves[:kill]) if path.name == "last.ckpt")
    for path in (run_dir / "checkpoints").iterdir():
        path.unlink()
    orphan = shutil.copy2(saves[kill][1], saves[kill][0])
    if not previous_best_deleted:
        shutil.copy2(saves[bests[-2]][1], saves[bests[-2]][0])
    shutil.copy2(saves[last_before][1], run_dir / "checkpoints" / "last.ckpt")
    orphan_score = _recorded_best(orphan)
    rows_before = len(_val_dice(run_dir))

    resumed = main([*args, "--resume", "last"])
    assert resumed.trainer.global_step == epochs * STEPS_PER_EPOCH
    (kept,) = _bests(run_dir)
    assert resumed.best_model_path == str(kept)
    replayed = _val_dice(run_dir)[rows_before:]
    assert replayed, "the resumed run validated nothing"
    best = resumed.trainer.checkpoint_callback.best_model_score
    assert float(best) == pytest.approx(max(orphan_score, *replayed), abs=1e-6)
    assert f"dice{float(best):.4f}" in kept.name


def _recorded_best(path: Path) -> float:
    """The best ``val/dice`` a checkpoint's monitored ``ModelCheckpoint`` recorded."""
    callbacks = _load(path)["callbacks"]
    (state,) = [v for k, v in callbacks.items() if k.startswith("ModelCheckpoint{'monitor': 'val/dice'")]
    return float(state["best_model_score"])


# --- unreadable checkpoint ---------------------------------------------------------------------------------


def test_resume_from_a_truncated_checkpoint_exits_2_naming_it_and_another_one(tmp_path, capsys):
    args = _args(tmp_path, "--trainer.max_epochs", "1")
    run_dir = Path(main(args).log_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # what a copy cut short leaves
    before = _files(tmp_path / "runs")
    code, line = _exit([*args, "--resume", "last"], capsys)
    assert code == 2 and f"checkpoint {last} is truncated or unreadable" in line, line
    (best,) = _bests(run_dir)
    assert line.endswith(f"resume from another one: --resume {best}")
    assert _files(tmp_path / "runs") == before
    again = main([*_args(tmp_path, "--trainer.max_epochs", "2"), "--resume", str(best)])
    assert again.trainer.global_step == 2 * STEPS_PER_EPOCH and Path(again.log_dir) == run_dir


# --- a diverging run ---------------------------------------------------------------------------------------


def test_a_diverging_run_exits_2_with_an_accurate_line_and_keeps_its_log(tmp_path, capsys):
    code, line = _exit(_args(tmp_path, "--model.optimizer.init_args.lr", "1e6", "--trainer.max_epochs", "3"),
                       capsys)
    assert code == 2, line
    said = re.search(r"(train|val) loss is (nan|inf|-inf) at epoch (\d+), global step (\d+) \(bf16-mixed "
                     r"precision\); (.*?); training stopped", line)
    assert said and int(said[4]) > 0, line
    assert "lower the learning rate (model.optimizer.init_args.lr: 1e+06)" in line
    assert "bf16-mixed or" not in line  # the run already is bf16-mixed: no advice to switch to it
    run_dir = tmp_path / "runs" / "debug" / "version_0"
    assert (run_dir / "metrics.csv").is_file()  # what it logged before it stopped stays
    saved = any(run_dir.rglob("*.ckpt"))
    assert ("the checkpoints saved before are kept" if saved else "no checkpoint was saved yet") in line


def _batch() -> dict[str, torch.Tensor]:
    label = torch.zeros(2, 16, 16, dtype=torch.long)
    label[:, 4:12, 4:12] = 1
    return {"image": label[:, None].float() + 0.1 * torch.randn(2, 1, 16, 16), "label": label}


def test_the_non_finite_loss_message_reports_the_weights_as_they_are():
    module = SegmentationModule(UNet(channels=(4, 8)))
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1e30)
    largest = re.escape(f"{max(float(p.detach().abs().max()) for p in module.parameters()):.3g}")
    with pytest.raises(NonFiniteLossError, match=rf"weights are still finite \(largest \|w\| {largest}\)"):
        module.training_step(_batch(), 0)
    with torch.no_grad():
        next(module.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"1 of \d+ weight tensors already hold NaN/inf"):
        module.training_step(_batch(), 0)


# --- config files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model:\n  net:\n    init_args:\n\tchannels: [4, 8]\n",
         r"config {path}, line 4, column 1: YAML syntax error: found character '\\t' that cannot start any "
         r"token \(indent with spaces, not tabs\)"),
        ("trainer:\n  max_epochs: 2\n  callbacks: [\n",
         r"config {path}, line 4, column 1: YAML syntax error"),
        ("model:\n  net:\n    init_args:\n      colour: red\n",
         r"Option 'colour' is not accepted \(set in {path}, line 4\)"),
        ("trainer:\n  max_epochs: many\n",
         r"trainer\.max_epochs.*Given value: many \(set in {path}, line 2\)"),
    ],
)
def test_a_bad_overlay_exits_2_naming_its_file(text, message, tmp_path, capsys):
    overlay = tmp_path / "bad.yaml"
    overlay.write_text(text)
    code, line = _exit(_args(tmp_path, "--config", str(overlay)), capsys)
    assert code == 2 and re.search(message.format(path=re.escape(str(overlay))), line), line
    assert not (tmp_path / "runs").exists()


def test_a_bad_key_given_on_the_command_line_is_not_blamed_on_an_overlay(tmp_path, capsys):
    overlay = tmp_path / "small.yaml"
    overlay.write_text("model:\n  net:\n    init_args:\n      channels: [4, 8]\n")
    args = _args(tmp_path, "--config", str(overlay), "--model.net.init_args.colour", "red")
    code, line = _exit(args, capsys)
    assert code == 2 and line.endswith("Option 'colour' is not accepted (given on the command line)"), line

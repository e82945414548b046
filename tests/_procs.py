"""Run ``python train.py`` as a real process (own session, output to files) and always clean it up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"
SBATCH = REPO / "configs" / "cluster" / "slurm.sbatch"


def sbatch_train_args(env: dict[str, str]) -> list[str]:
    """The ``train.py`` arguments of the SLURM template's ``srun`` line, expanded by bash with ``env``
    (``CONFIG`` defaults to ``unet_skip`` as in the script)."""
    text = SBATCH.read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith("srun python train.py")]
    words = line.split("train.py", 1)[1].replace('"$@"', "")
    expanded = subprocess.run(
        ["bash", "-c", f'set -u; printf "%s\\n" {words}'],
        env={"PATH": "/usr/bin:/bin", "CONFIG": "unet_skip", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return expanded.stdout.splitlines()


def train_env(**extra: str) -> dict[str, str]:
    """The environment of a training process: offline W&B, one thread per process, the repo importable."""
    env = dict(os.environ)
    env.pop("WANDB_SERVICE", None)  # set by an in-process W&B run: the child would share (and hang on) it
    for key in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        env.pop(key, None)  # a DDP worker's variables: Lightning would not launch the other ranks
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        NO_ALBUMENTATIONS_UPDATE="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    env.update(extra)
    return env


class TrainProcess:
    """``python train.py *args`` in a new session, so that a signal or a kill reaches the whole process group
    (DDP workers, the W&B service) and nothing outlives the test.

    >>> with TrainProcess(["--help"], cwd=".", log_dir="/tmp") as proc:  # doctest: +SKIP
    ...     proc.wait(60)
    """

    def __init__(
        self, args: list[str], cwd: Path | str, log_dir: Path | str, env: dict | None = None
    ) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._out = open(self.log_dir / "stdout.txt", "wb")  # noqa: SIM115
        self._err = open(self.log_dir / "stderr.txt", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(TRAIN), *args],
            cwd=cwd,
            env=env or train_env(),
            stdout=self._out,
            stderr=self._err,
            start_new_session=True,
        )

    @property
    def stderr(self) -> str:
        return self._read(self._err, "stderr.txt")

    @property
    def stdout(self) -> str:
        return self._read(self._out, "stdout.txt")

    def _read(self, file: Any, name: str) -> str:
        if not file.closed:
            file.flush()
        return (self.log_dir / name).read_text(errors="replace")

    def group_alive(self) -> bool:
        """Whether any process of the group is still there."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int:
        """Exit status of the main process; on timeout the group is killed and the test fails."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"train.py hung for {timeout} s; stderr:\n{self.stderr[-3000:]}") from None

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``condition`` while the process runs; fail naming ``what`` if it exits or times out first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"train.py exited ({self.proc.returncode}) before {what}; stderr:\n{self.stderr[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout} s; stderr tail:\n{self.stderr[-3000:]}")
            time.sleep(0.05)

    def group_gone_within(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.group_alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def __enter__(self) -> TrainProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.group_alive():
            self.signal_group(signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait()
        self._out.close()
        self._err.close()

"""Shared test setup: W&B offline, no albumentations update check, small thread count, CLI helpers."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny tensors on a shared 2-core machine: one thread avoids OpenMP contention (10x faster here).
torch.set_num_threads(1)


@pytest.fixture
def run_args(tmp_path):
    """Arguments that keep a CLI run's files (logs, checkpoints, W&B) inside the test's tmp folder."""
    return ["--trainer.default_root_dir", str(tmp_path), "--logging.save_dir", str(tmp_path / "runs")]

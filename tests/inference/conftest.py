"""Checkpoints shared by the inference tests: tiny real trainings of the debug config, once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from unetseg.training.cli import main

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _train(folder: Path, *extra: str) -> str:
    """A tiny checkpoint from the debug config; returns the path of last.ckpt."""
    args = ["--config", "debug", "--trainer.default_root_dir", str(folder), "--logging.save_dir"]
    result = main([*args, str(folder / "runs"), *QUIET, "--test", "false", *extra])
    return str(Path(result.best_model_path).with_name("last.ckpt"))


@pytest.fixture(scope="session")
def ckpt_2d(tmp_path_factory) -> str:
    return _train(tmp_path_factory.mktemp("ckpt2d"))


@pytest.fixture(scope="session")
def ckpt_2d_other_seed(tmp_path_factory) -> str:
    """Another 2D model of the same setup (classes, channels, preprocessing), trained from another seed."""
    return _train(tmp_path_factory.mktemp("ckpt2d_seed1"), "--seed_everything", "1")


@pytest.fixture(scope="session")
def ckpt_3d(tmp_path_factory) -> str:
    return _train(tmp_path_factory.mktemp("ckpt3d"), "--data.spatial_dims", "3", "--data.spatial_size", "16")

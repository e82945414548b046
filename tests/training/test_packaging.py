"""The package as users install it: a wheel carrying the configs, console scripts that run from any folder."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from setuptools import find_packages

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_package_list_is_every_unetseg_package_plus_the_configs():
    packages = PYPROJECT["tool"]["setuptools"]["packages"]
    assert len(packages) == len(set(packages))
    assert set(packages) == {*find_packages(str(REPO), include=["unetseg", "unetseg.*"]), "unetseg.configs"}
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"unetseg.configs": "configs"}


def test_every_console_script_names_a_function():
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) == {f"unetseg-{name}" for name in ("train", "predict", "export", "ablate", "plan")}
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def _wheel(tmp_path: Path) -> Path:
    """A wheel built the way users build one (``pip wheel``), from a clean copy of the sources."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("unetseg", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("unetseg-*.whl")
    return wheel


def test_the_installed_wheel_trains_from_any_folder_with_its_own_configs(tmp_path):
    wheel = _wheel(tmp_path)
    shipped = {f"unetseg/configs/{name}" for name in ("unet_skip.yaml", "debug.yaml", "cluster/ddp.yaml")}
    assert shipped <= set(zipfile.ZipFile(wheel).namelist())
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"  # no configs/ here: the packaged copy must be found
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1"}
    origin = subprocess.run(
        [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('unetseg').origin)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    )
    assert Path(origin.stdout.strip()).is_relative_to(site)  # the installed copy, not the checkout
    train = subprocess.run(
        [str(site / "bin" / "unetseg-train"), "--config", "debug", "--trainer.fast_dev_run", "true",
         "--logging.wandb", "false"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "unetseg: trained 1 step in" in train.stderr
    run_dir = elsewhere / "runs" / "debug" / "version_0"
    assert (run_dir / "summary.json").is_file() and (run_dir / "per_case.csv").is_file()  # the test's results

"""Checkpoint loading without Lightning: same net as the LightningModule's loader, no import of training."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unetseg import SegmentationModule
from unetseg.inference.checkpoint import CheckpointModel, checkpoint_files
from unetseg.nets.build import build_net

REPO = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> set[str]:
    """The modules a Python file imports (``import x`` and ``from x import y``), at any depth."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_inference_does_not_import_training():
    # training imports the inferer and the checkpoint reader from inference: the reverse would be a cycle.
    files = sorted((REPO / "unetseg" / "inference").glob("*.py"))
    assert {f.name for f in files} >= {"checkpoint.py", "predict.py", "export.py", "inferer.py"}
    for path in files:
        imported = _imported_modules(path)
        assert not {m for m in imported if m.startswith("unetseg.training") or "lightning" in m}, path
    assert not {m for m in _imported_modules(REPO / "unetseg/nets/build.py") if "lightning" in m}


def test_checkpoint_model_matches_the_lightning_module_loader(ckpt_2d):
    model = CheckpointModel.load(ckpt_2d)
    module = SegmentationModule.load_for_inference(ckpt_2d)
    assert not model.training and not module.training
    assert model.class_names == module.class_names == ["background", "organ", "lesion", "vessel"]
    assert model.preprocessing == module.preprocessing and model.preprocessing["normalization"] == "zscore"
    assert model.inference == module.inference and model.hparams["net"] == module.hparams["net"]
    assert (model.spatial_dims, model.in_channels) == (2, 1)
    for key, value in module.net.state_dict().items():
        torch.testing.assert_close(model.net.state_dict()[key], value, rtol=0, atol=0)
    x = torch.randn(2, 1, 40, 24)
    with torch.no_grad():
        torch.testing.assert_close(model.infer(x), module.infer(x), rtol=0, atol=0)


def test_checkpoint_loads_and_runs_without_lightning(ckpt_2d):
    code = (
        "import sys, torch\n"
        "from unetseg.inference.checkpoint import CheckpointModel\n"
        f"model = CheckpointModel.load({ckpt_2d!r})\n"
        "with torch.no_grad():\n"
        "    print(tuple(model.infer(torch.rand(1, 1, 32, 32)).shape))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
        "print(sorted(m for m in sys.modules if m.startswith('unetseg.training')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["(1, 4, 32, 32)", "[]", "[]"]


def test_build_net_only_builds_known_module_classes():
    net = build_net({"class_path": "unetseg.nets.unet.UNet", "init_args": {"channels": [4, 8]}})
    assert type(net).__name__ == "UNet"
    with pytest.raises(ValueError, match=r"ckpt X: net class 'evil.Net' is neither in unetseg"):
        build_net({"class_path": "evil.Net"}, "ckpt X")
    with pytest.raises(ValueError, match=r"'unetseg.nets.build.build_net' is not a torch.nn.Module class"):
        build_net({"class_path": "unetseg.nets.build.build_net"})
    with pytest.raises(ValueError, match=r"cannot build unetseg.nets.unet.UNet from \{'width': 3\}"):
        build_net({"class_path": "unetseg.nets.unet.UNet", "init_args": {"width": 3}})


def test_checkpoint_folders_give_one_model_per_run(ckpt_2d, tmp_path):
    for fold in ("fold_0", "fold_1"):
        run = tmp_path / "cv" / fold / "version_0" / "checkpoints"
        run.mkdir(parents=True)
        for name in ("best-epoch000-dice0.1000.ckpt", "last.ckpt"):
            shutil.copy(ckpt_2d, run / name)
    (tmp_path / "cv" / "fold_2" / "checkpoints").mkdir(parents=True)  # a run with only last.ckpt
    shutil.copy(ckpt_2d, tmp_path / "cv" / "fold_2" / "checkpoints" / "last.ckpt")
    found = [p.relative_to(tmp_path / "cv").as_posix() for p in checkpoint_files(tmp_path / "cv")]
    assert found == [
        "fold_0/version_0/checkpoints/best-epoch000-dice0.1000.ckpt",
        "fold_1/version_0/checkpoints/best-epoch000-dice0.1000.ckpt",
        "fold_2/checkpoints/last.ckpt",
    ]
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("b.ckpt", "a.ckpt"):
        shutil.copy(ckpt_2d, flat / name)
    assert [p.name for p in checkpoint_files([flat, ckpt_2d])] == ["a.ckpt", "b.ckpt", "last.ckpt"]
    with pytest.raises(FileNotFoundError, match=rf"no checkpoint \(.ckpt\) in {re.escape(str(tmp_path))}"):
        (tmp_path / "empty").mkdir()
        checkpoint_files(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"checkpoint .*a.ckpt is given twice"):
        checkpoint_files([flat / "a.ckpt", flat])

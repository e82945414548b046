"""The torchvision shim (``python -m unetseg.compat.torchvision_cpu_shim``) on a stand-in for PyPI's CUDA
wheel.

The stand-in fails exactly as the real wheel does on the CPU build of torch: its compiled library cannot be
loaded, and its ``__init__`` registers a fake kernel for ``torchvision::nms`` anyway. The tests install the
shim into a temporary site folder, never into the environment running them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from unetseg.compat import torchvision_cpu_shim as shim

FAKE_INIT = '''
import importlib.abc
import importlib.machinery
import sys
import types

import torch

# what the real torchvision/__init__.py does (torchvision._meta_registrations)
@torch.library.register_fake("torchvision::nms")
def _nms(dets, scores, iou_threshold):
    return dets.new_empty(0, dtype=torch.long)

__version__ = "0.0.fake"


class _Stub:
    def __init__(self, *args, **kwargs):
        pass


def _stub_attribute(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Stub


class _Submodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # torchvision.models, .transforms, ... as empty modules whose every attribute is a stub class, so that
    # torchmetrics (imported by lightning) imports
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _stub_attribute
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(_Submodules())
'''


@pytest.fixture
def fake_torchvision(tmp_path, monkeypatch) -> Path:
    """A ``torchvision`` package whose ``_C.so`` is not a shared library, first on ``PYTHONPATH``."""
    package = tmp_path / "fake" / "torchvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_INIT)
    (package / "_C.so").write_bytes(b"not an ELF file")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(package.parent), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(package.parent))  # for the find_spec in `install`
    return package.parent


def python(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter, without the shim where this environment has it installed (CI)."""
    return subprocess.run(
        [sys.executable, "-c", f"{shim.WITHOUT_SHIM} {code}"], capture_output=True, text=True, timeout=120
    )


def test_the_stand_in_fails_like_the_cuda_wheel(fake_torchvision):
    result = python("import torchvision")
    assert result.returncode != 0
    assert "operator torchvision::nms does not exist" in result.stderr


def test_finder_declares_the_ops_only_when_the_library_does_not_load(fake_torchvision):
    count = "sum(type(f).__name__ == '_TorchvisionFinder' for f in sys.meta_path)"
    result = python(
        "import sys; from unetseg.compat import torchvision_cpu_shim as s; s.register(); s.register();"
        f"before = {count}; import torch, torchvision;"
        "print(before, torchvision.__version__, hasattr(torch.ops.torchvision, 'nms'),"
        f" hasattr(torch.ops.torchvision, 'qnms'), {count})"
    )
    assert result.returncode == 0, result.stderr
    # registered once, torchvision imported, both schemas declared, then the finder removed itself
    assert result.stdout.split() == ["1", "0.0.fake", "True", "True", "0"]


def test_install_check_uninstall_round_trip(fake_torchvision, tmp_path, capsys):
    site = tmp_path / "site"
    assert shim.main(["install", "--site-packages", str(site)]) == 0
    assert "installed" in capsys.readouterr().out
    assert sorted(p.name for p in site.iterdir()) == [f"{shim.NAME}.pth", f"{shim.NAME}.py"]
    # the .pth file is what makes a fresh interpreter import torchvision (and lightning) now
    ok = python(f"import site; site.addsitedir({str(site)!r}); import lightning, torchvision; print('ok')")
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr
    assert shim.main(["check", "--site-packages", str(site)]) == 0
    assert "import lightning, torchvision: ok (torchvision 0.0.fake)" in capsys.readouterr().out
    assert shim.main(["install", "--site-packages", str(site)]) == 0  # idempotent
    assert shim.main(["uninstall", "--site-packages", str(site)]) == 0
    assert list(site.iterdir()) == []
    assert shim.main(["check", "--site-packages", str(site)]) == 1
    assert "torchvision::nms does not exist" in capsys.readouterr().out


def test_install_does_nothing_when_torchvision_imports(tmp_path, monkeypatch, capsys):
    package = tmp_path / "fake" / "torchvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("__version__ = '0.0.cpu'\n")  # a CPU build: imports fine
    monkeypatch.setenv("PYTHONPATH", str(package.parent))
    monkeypatch.syspath_prepend(str(package.parent))
    site = tmp_path / "site"
    assert shim.main(["install", "--site-packages", str(site)]) == 0
    assert "works without the shim: nothing to do" in capsys.readouterr().out
    assert not site.exists()


def test_install_refuses_a_different_failure(tmp_path, monkeypatch, capsys):
    package = tmp_path / "fake" / "torchvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('libjpeg missing')\n")
    monkeypatch.setenv("PYTHONPATH", str(package.parent))
    monkeypatch.syspath_prepend(str(package.parent))
    site = tmp_path / "site"
    assert shim.main(["install", "--site-packages", str(site)]) == 1
    out = capsys.readouterr().out
    assert "fails for another reason" in out and "libjpeg missing" in out
    assert not site.exists()


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        shim.main(["instal"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'instal'" in capsys.readouterr().err


def test_import_unetseg_is_light():
    """``python -m unetseg.compat.torchvision_cpu_shim`` must run where ``import lightning`` is broken."""
    result = python("import sys, unetseg; print([m for m in ('torch', 'lightning') if m in sys.modules])")
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


@pytest.mark.skipif(
    not os.environ.get("UNETSEG_REQUIRE_SMP") and shim.importlib.util.find_spec("torchvision") is None,
    reason="torchvision is not installed (the [smp] extra)",
)
def test_this_environment_imports_torchvision_and_lightning():
    """Where the [smp] extra is installed (CI), torchvision and lightning import, with or without the shim."""
    code = "import lightning, torchvision, segmentation_models_pytorch; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr

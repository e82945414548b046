"""Make the PyPI torchvision wheel importable next to the CPU build of torch (needed by the ``[smp]`` extra).

Why: torchvision's Linux wheels on PyPI are CUDA builds. Their compiled ops (``torchvision/_C.so``) link
against ``libtorch_cuda.so``/``libc10_cuda.so``, which the CPU build of torch does not have, so torchvision
skips them (``torchvision.extension._has_ops() == False``) -- which it handles -- but then registers fake
kernels for ``torchvision::nms`` and ``torchvision::qnms`` without checking that the ops exist, and
``import torchvision`` fails with ``RuntimeError: operator torchvision::nms does not exist``. torchmetrics
imports torchvision whenever it is installed, so ``import lightning`` fails too.

What: ``install`` writes two files into the environment's site-packages: this module (as
``unetseg_torchvision_cpu_shim.py``) and ``unetseg_torchvision_cpu_shim.pth``. At interpreter start the
``.pth`` adds a finder to ``sys.meta_path`` (stdlib only, torch is not imported). The first time anything
imports ``torchvision`` the finder tries to load ``torchvision/_C.so`` exactly as torchvision does; only if
that fails it declares the schemas of ``torchvision::nms`` and ``torchvision::qnms`` (no kernels), then
steps aside. torchvision then imports; its pure-Python parts (models, transforms, ``ops.misc``) work, and
its compiled ops still raise torchvision's own "Couldn't load custom C++ ops" error. No file of torch or
torchvision is modified; ``uninstall`` removes the two files. ``install`` does nothing when
``import torchvision`` already works (a CPU or matching CUDA build).

Usage (after ``pip install -c constraints.txt -e ".[dev,smp]"``)::

    python -m unetseg.compat.torchvision_cpu_shim install     # or: uninstall, check
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

NAME = "unetseg_torchvision_cpu_shim"
#: Ops whose fake kernels torchvision registers without checking that its compiled library loaded.
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
#: Python statements that remove an already registered finder (of a shim in another site folder).
WITHOUT_SHIM = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != '_TorchvisionFinder'];"
)
_LIBRARIES: list[object] = []  # keeps the torch.library.Library alive (the definitions die with it)


def _declare_missing_ops() -> None:
    """Load torchvision's compiled ops like torchvision does; declare the schemas above if that fails."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import torch

    for folder in spec.submodule_search_locations:
        for path in sorted(Path(folder).glob("_C.*so")):
            try:
                torch.ops.load_library(str(path))
                return  # the ops loaded: nothing to do
            except (ImportError, OSError):
                pass
    if hasattr(torch.ops.torchvision, "nms"):
        return
    library = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        library.define(schema)
    _LIBRARIES.append(library)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Runs :func:`_declare_missing_ops` before the first import of ``torchvision``, then removes itself."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> None:
        if fullname == "torchvision":
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _declare_missing_ops()
        return None  # the regular finders import the module


def register() -> None:
    """Add the finder (called from the ``.pth`` file at interpreter start)."""
    if "torchvision" not in sys.modules and not any(
        type(f).__name__ == "_TorchvisionFinder" for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _TorchvisionFinder())


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _imports(code: str, site: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter of this environment that has processed the ``.pth`` files of
    ``site`` (it does at start when ``site`` is the environment's own site-packages). For another ``site``
    a shim installed in the environment's own site-packages is removed first: only ``site`` counts."""
    if site != _site_packages():
        code = f"{WITHOUT_SHIM} import site; site.addsitedir({str(site)!r}); {code}"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    """``install`` (only where ``import torchvision`` fails the way the shim fixes), ``uninstall`` or
    ``check``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m unetseg.compat.torchvision_cpu_shim",
        description="Make the PyPI (CUDA) torchvision wheel importable with the CPU build of torch.",
    )
    parser.add_argument("command", nargs="?", default="check", choices=["install", "uninstall", "check"])
    parser.add_argument(
        "--site-packages",
        type=Path,
        default=_site_packages(),
        help="folder for the shim's .py and .pth files (default: this environment's site-packages)",
    )
    args = parser.parse_args(argv)
    site: Path = args.site_packages
    module, pth = site / f"{NAME}.py", site / f"{NAME}.pth"
    if args.command == "uninstall":
        for path in (module, pth):
            path.unlink(missing_ok=True)
        print(f"removed {module.name} and {pth.name} from {site}")
        return 0
    if args.command == "install":
        if importlib.util.find_spec("torchvision") is None:
            print("torchvision is not installed: nothing to do")
            return 0
        for path in (module, pth):
            path.unlink(missing_ok=True)
        plain = _imports("import torchvision", site)
        if plain.returncode == 0:
            print("import torchvision works without the shim: nothing to do")
            return 0
        if "torchvision::nms does not exist" not in plain.stderr:
            print(f"import torchvision fails for another reason; the shim cannot help:\n{plain.stderr}")
            return 1
        site.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(__file__, module)
        pth.write_text(f"import {NAME}; {NAME}.register()\n")
        print(f"installed {module.name} and {pth.name} in {site}")
    checked = _imports("import lightning, torchvision; print(torchvision.__version__)", site)
    if checked.returncode != 0:
        print(f"import lightning, torchvision fails:\n{checked.stderr}")
        return 1
    print(f"import lightning, torchvision: ok (torchvision {checked.stdout.strip()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

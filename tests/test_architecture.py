"""The tree is the architecture: layers point one way, no import cycles, nets without Lightning.

Imports are read from the source (AST), including those inside functions, so a lazy import cannot hide a
cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unetseg"
# What each part may import from unetseg (besides itself); anything else is a layering error.
ALLOWED: dict[str, set[str]] = {
    "nets": set(),
    "compat": set(),
    "losses": set(),
    "metrics": set(),
    "data": set(),
    "inference": {"nets", "data"},
    "plan": {"data"},
    "evaluation": set(),
    "training": {"nets", "data", "inference", "losses", "metrics", "plan"},
    "analysis": {"nets", "data", "inference", "losses", "metrics", "training", "evaluation", "plan"},
    "__init__": {"nets", "data", "training"},
}
NO_LIGHTNING = ("nets", "data/formats", "inference/checkpoint.py", "inference/inferer.py", "plan")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module path imported by the file (absolute ``import``/``from`` forms)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {_module_name(p): p for p in FILES}


def _graph() -> dict[str, set[str]]:
    """unetseg module -> the unetseg modules it imports (names resolved to existing modules)."""
    graph = {}
    for name, path in MODULES.items():
        targets = set()
        for imported in _imports(path):
            while imported and imported not in MODULES:
                imported = imported.rpartition(".")[0]
            if imported.startswith("unetseg.") and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_subpackage_imports_only_the_layers_below_it():
    wrong = [
        f"{src} imports {dst}"
        for src, targets in _graph().items()
        for dst in targets
        if _part(dst) != _part(src) and _part(dst) not in ALLOWED[_part(src)] and dst != "unetseg"
    ]
    assert not wrong, "\n".join(wrong)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_files():
    graph = {k: {t for t in v if t != "unetseg"} for k, v in _graph().items()}
    # a package's __init__ re-exporting its own modules is not a cycle of logic
    graph = {
        k: {t for t in v if not (MODULES[k].name == "__init__.py" and t.startswith(k + "."))}
        for k, v in graph.items()
    }
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_import_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for src, targets in _graph().items():
        graph.setdefault(_part(src), set()).update(_part(t) for t in targets if _part(t) != _part(src))
    graph.pop("__init__", None)
    assert _cycle({k: v - {"__init__"} for k, v in graph.items()}) is None


@pytest.mark.parametrize("part", NO_LIGHTNING)
def test_pure_parts_import_no_lightning(part):
    target = PACKAGE / part
    files = [target] if target.is_file() else sorted(target.rglob("*.py"))
    offenders = [
        str(f)
        for f in files
        if any(i.split(".")[0] in ("lightning", "pytorch_lightning") for i in _imports(f))
    ]
    assert files and not offenders, offenders


def test_the_graph_sees_a_real_import():
    # guards the test itself: the module importing the inferer must show up as an edge
    assert "unetseg.inference.inferer" in _graph()["unetseg.training.module"]

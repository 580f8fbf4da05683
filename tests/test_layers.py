"""The package's import graph: no cycles, and imports only point down the layers.

Layers (docs/architecture.md): core < algorithms, gpu < select < public face < tools.
Function-level imports count too; the one exception is ``core/devices.py``, the lazy seam
through which core reaches ``gpu`` where a device buffer is met.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "pya2a"
LAYER = {"core": 0, "algorithms": 1, "gpu": 1, "select": 2, "tools": 4}
SEAM = "pya2a.core.devices"

pytestmark = pytest.mark.serial


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _targets(mod: str, path: Path, node: ast.AST, mods: dict[str, Path]) -> list[str]:
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    if isinstance(node, ast.ImportFrom):
        if node.module == "__future__":
            return []
        if node.level:
            base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
            name = ".".join(base + ([node.module] if node.module else []))
        else:
            name = node.module or ""
        names = [f"{name}.{a.name}" for a in node.names]
        names = [n if n in mods else name for n in names]
    else:
        names = [a.name for a in node.names]
    out = []
    for n in names:
        while n and n not in mods and "." in n:
            n = n.rsplit(".", 1)[0]
        if n in mods and n != mod:
            out.append(n)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(_targets(mod, path, node, mods))
        if mod == SEAM:
            deps = {d for d in deps if not d.startswith("pya2a.gpu")}
        graph[mod] = deps
    return graph


def _layer(mod: str) -> int:
    parts = mod.split(".")
    if parts == ["pya2a", "__main__"]:
        return 5
    return LAYER.get(parts[1], 3) if len(parts) > 1 else 3


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(v: str, trail: list[str]) -> None:
        state[v] = 1
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                cycles.append(trail[trail.index(w):] + [w])
            elif w not in state:
                visit(w, trail + [w])
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v, [v])
    assert not cycles, cycles


def test_imports_point_down_the_layers():
    up = [(m, d) for m, ds in _graph().items() for d in ds
          if d != "pya2a" and _layer(d) > _layer(m)]
    assert not up, up


def test_core_never_imports_gpu_except_through_the_seam():
    bad = [(m, d) for m, ds in _graph().items() if m.startswith("pya2a.core")
           for d in ds if d.startswith("pya2a.gpu")]
    assert not bad, bad

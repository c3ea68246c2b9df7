"""The package's imports run one way, top to bottom, with no cycles (issue #10).

Layers, lowest first: ``core`` -> ``dicom``, ``preprocess``, ``encoders``, ``storage`` -> ``pipeline``,
``search``, ``analysis``, ``train``, ``pacs`` -> ``app``. A module may import its own layer's packages or lower ones,
never a higher one, not even under ``TYPE_CHECKING`` or inside a function; and no two subpackages may
import each other (directly or through others).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mammo_retrieval"
LAYERS = {
    "core": 0,
    "dicom": 1, "preprocess": 1, "encoders": 1, "storage": 1,
    "pipeline": 2, "search": 2, "analysis": 2, "train": 2, "pacs": 2,
    "app": 3,
}
NOT_CODE = {"weights"}  # data folders shipped inside the package


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every mammo_retrieval module this file imports, wherever the import statement stands."""
    tree = ast.parse(path.read_text(), str(path))
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "mammo_retrieval")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "mammo_retrieval":
                found.add(target)
    return found


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    """Subpackage -> the subpackages it imports."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = _subpackage(_module_name(path))
        if source is None or source.startswith("_"):
            continue
        for target in map(_subpackage, _imports(path)):
            if target and target != source and not target.startswith("_"):
                graph.setdefault(source, set()).add(target)
    return graph


def test_every_subpackage_has_a_layer():
    present = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    assert modules == set(), f"modules outside any layer: {sorted(modules)}"
    assert present - set(LAYERS) - NOT_CODE == set(), "place each subpackage in LAYERS"


def test_no_upward_import():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        source = _subpackage(_module_name(path))
        if source not in LAYERS:
            continue
        for imported in _imports(path):
            target = _subpackage(imported)
            if target in LAYERS and LAYERS[target] > LAYERS[source]:
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports {imported}")
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_no_cycle_between_subpackages():
    graph = _graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, trail: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle.extend(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, trail + [nxt]):
                return True
        state[node] = 2
        return False

    for start in sorted(graph):
        if state.get(start) is None and visit(start, [start]):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_a_planted_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a core module importing app is reported."""
    fake = tmp_path / "mammo_retrieval"
    (fake / "core").mkdir(parents=True)
    (fake / "app").mkdir()
    for folder in (fake, fake / "core", fake / "app"):
        (folder / "__init__.py").write_text("")
    (fake / "core" / "bad.py").write_text("def f():\n    from ..app import workspace\n")
    (fake / "app" / "workspace.py").write_text("from mammo_retrieval.core import bad\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match="core/bad.py imports mammo_retrieval.app"):
        test_no_upward_import()
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_cycle_between_subpackages()

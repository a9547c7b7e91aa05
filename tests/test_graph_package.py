"""The channel graph's package stands below pruning and compaction: it imports neither, both import it, and it
stays readable (no module over 400 lines, no function over 60)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pruneflow"
GRAPH_FILES = sorted((PACKAGE / "graph").rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions (a lazy import is still an import)."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("path", GRAPH_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_graph_imports_neither_pruning_nor_compaction(path: Path) -> None:
    upper = {m for m in imported_modules(path) if m.startswith(("pruneflow.pruning", "pruneflow.compaction"))}
    assert not upper, f"{path.name} imports {sorted(upper)}"


@pytest.mark.parametrize("package", ["pruning", "compaction"])
def test_pruning_and_compaction_read_the_graph(package: str) -> None:
    importers = [p for p in (PACKAGE / package).glob("*.py") if "pruneflow.graph" in imported_modules(p)]
    assert importers, f"nothing in pruneflow/{package} imports pruneflow.graph"
    stale = [p.name for p in (PACKAGE / package).glob("*.py") if "pruneflow.pruning.channels" in imported_modules(p)]
    assert not stale


@pytest.mark.parametrize("path", GRAPH_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_graph_modules_and_functions_are_short(path: Path) -> None:
    source = path.read_text()
    assert len(source.splitlines()) <= 400, f"{path.name} has {len(source.splitlines())} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 60, f"{path.name}: {node.name} has {length} lines"

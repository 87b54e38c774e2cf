"""The streamdet modules import each other without a cycle, function-level imports included.

A cycle works only as long as every import in it stays lazy or in the right order; moving one
import to the top of a file then breaks start-up with a half-initialised module. The graph is
read from the source with ``ast``, so an import inside a function counts as much as one at the
top. A package's ``__init__.py`` is the package's node; importing ``pkg.sub`` (or
``from pkg import sub``) is an edge to ``pkg.sub`` alone, not to ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "streamdet"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_name(path: Path, root: Path) -> str:
    """``<root>/inference/engine.py`` -> ``streamdet.inference.engine``; a package's
    ``__init__.py`` -> the package's name."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the modules under ``root`` it imports, from every import statement at any depth."""
    modules = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, package)
                for alias in node.names:
                    # ``from pkg import sub`` imports the module pkg.sub; ``from pkg import f``, pkg
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The absolute module name of a (possibly relative) ``from ... import``."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - (node.level - 1)])
    return f"{base}.{node.module}" if node.module else base


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None when the graph is acyclic (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the search path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_streamdet_modules_import_each_other_without_a_cycle() -> None:
    graph = import_graph(ROOT)
    assert "streamdet.pipeline" in graph  # the graph was read from the package

    cycle = find_cycle(graph)

    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"a"}}, ["a", "a"]),
        ({"a": {"b"}, "b": set(), "c": {"d"}, "d": {"c"}}, ["c", "d", "c"]),
    ],
)
def test_find_cycle_reports_the_cycle_it_finds(graph: dict[str, set[str]], expected) -> None:
    assert find_cycle(graph) == expected


def test_function_level_and_relative_imports_are_edges(tmp_path: Path) -> None:
    """The graph must see imports inside functions and relative ones, or it misses cycles."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from streamdet.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from .b import g\n")
    (pkg / "sub" / "b.py").write_text("import streamdet.a\n\ndef g():\n    from .. import a\n")

    graph = import_graph(pkg)

    assert graph == {
        "streamdet": set(),
        "streamdet.a": {"streamdet.sub.b"},
        "streamdet.sub": {"streamdet.sub.b"},
        "streamdet.sub.b": {"streamdet.a"},
    }
    assert find_cycle(graph) == ["streamdet.a", "streamdet.sub.b", "streamdet.a"]

"""The packages of ``src/userip`` import each other without a cycle.

Every module under ``src/userip`` is parsed with ``ast`` (nothing is imported, so no import cost and no side
effect); every import counts, at any depth: module level, inside functions, under ``TYPE_CHECKING``, and
``importlib.import_module("userip...")`` with a literal name. Each module maps to its top-level package of
``userip`` (``userip.profile.stage`` -> ``profile``); ``userip/__init__.py`` and ``userip/cli.py`` are the
root, which may import anything, so their edges are left out. An import inside one package is no edge of the
package graph; the module graph (every module of ``userip``, the root and the package ``__init__`` files
included) must be acyclic too, so no two modules of one package lean on each other either (a lazy import
inside a function hides such a circle from Python, not from this test).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "userip"
ROOT_MODULES = {"userip", "userip.cli"}  # the entry points: they may import every package


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, name: str, is_package: bool = False) -> set[str]:
    """Absolute names of all that the module ``name`` (code ``source``) imports, relative imports resolved."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # ``from userip import codebook`` names a package, not an attribute of the root
            found.update(f"{module}.{alias.name}" for alias in node.names if module == PACKAGE)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def top_package(module: str) -> str | None:
    """``userip.profile.stage`` -> ``profile``; None for the root and for modules outside ``userip``."""
    if module in ROOT_MODULES or not module.startswith(PACKAGE + "."):
        return None
    return module.split(".")[1]


def package_graph() -> dict[str, dict[str, set[str]]]:
    """package -> imported package -> the modules whose imports make that edge (for the failure message)."""
    graph: dict[str, dict[str, set[str]]] = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        source = module_name(path)
        src_pkg = top_package(source)
        if src_pkg is None:
            continue
        graph.setdefault(src_pkg, {})
        code = path.read_text(encoding="utf-8")
        for target in imported_modules(code, source, is_package=path.name == "__init__.py"):
            dst_pkg = top_package(target)
            if dst_pkg is not None and dst_pkg != src_pkg:
                graph[src_pkg].setdefault(dst_pkg, set()).add(f"{source} -> {target}")
    return graph


def module_graph() -> dict[str, dict[str, set[str]]]:
    """module -> imported ``userip`` module -> {}: ``from pkg import sub`` names the submodule ``pkg.sub``
    when it is one (the package's ``__init__`` otherwise); modules outside ``userip`` are left out."""
    paths = sorted((SRC / PACKAGE).rglob("*.py"))
    modules = {module_name(path) for path in paths}
    graph: dict[str, dict[str, set[str]]] = {}
    for path in paths:
        source = module_name(path)
        code = path.read_text(encoding="utf-8")
        edges = graph.setdefault(source, {})
        for target in imported_modules(code, source, is_package=path.name == "__init__.py"):
            if target in modules and target != source:
                edges.setdefault(target, set())
        for node in ast.walk(ast.parse(code, source)):  # ``from userip.lm import offline``: the submodule
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if sub in modules and sub != source:
                        edges.setdefault(sub, set())
    return graph


def find_cycle(graph: dict[str, dict[str, set[str]]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None when the graph is acyclic (depth-first search, sorted order)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_graph_sees_every_package():
    graph = package_graph()
    expected = {p.name for p in (SRC / PACKAGE).iterdir() if (p / "__init__.py").exists()}
    assert set(graph) == expected
    assert "codebook" in graph["profile"]  # a known edge: the test reads imports at all


def test_imports_at_any_depth_and_relative_ones_count():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from userip.data.schema import Dataset\n"
        "def f():\n    from userip.profile.model import ProfileModel\n    import userip.ctr.layers\n"
        "    return importlib.import_module('userip.serving.app')\n"
        "from . import kmeans\nfrom ..feature_bank import FeatureBank\nfrom userip import lm\n"
    )
    found = imported_modules(source, "userip.codebook.stage")
    assert {
        "userip.data.schema",
        "userip.profile.model",
        "userip.ctr.layers",
        "userip.serving.app",
        "userip.codebook",
        "userip.feature_bank",
        "userip.lm",
    } <= found
    assert [top_package(m) for m in ("userip", "userip.cli", "numpy", "userip.ctr.layers")] == [
        None,
        None,
        None,
        "ctr",
    ]


def test_find_cycle_reports_one():
    graph = {"a": {"b": set()}, "b": {"c": set()}, "c": {"a": set()}, "d": {"a": set()}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": set()}, "b": {}}) is None


def test_package_import_graph_is_acyclic():
    graph = package_graph()
    cycle = find_cycle(graph)
    if cycle is not None:
        edges = [
            f"  {a} -> {b}: " + "; ".join(sorted(graph[a][b])) for a, b in zip(cycle, cycle[1:], strict=False)
        ]
        raise AssertionError("import cycle between packages: " + " -> ".join(cycle) + "\n" + "\n".join(edges))


def test_module_import_graph_is_acyclic_within_packages_too():
    graph = module_graph()
    assert "userip.lm.offline" in graph["userip.lm.resolve"]  # a known edge: the test reads imports at all
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between modules: " + " -> ".join(cycle or [])

"""No import cycle among farense's modules, the Prefect tasks and the flows.

The graph is read from the source (ast), with every import counted wherever it is written: at the top, inside a
function, under `if TYPE_CHECKING:`. So an import moved into a function to dodge a cycle is still a cycle here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"farense": ROOT / "src" / "farense", "tasks": ROOT / "tasks", "flows": ROOT / "flows"}


def module_files(packages: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> its file, for every .py file of the packages (a package is its __init__.py)."""
    files = {}
    for package, folder in packages.items():
        for f in sorted(folder.rglob("*.py")):
            parts = [package, *f.relative_to(folder).with_suffix("").parts]
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return files


def imported_names(module: str, is_package: bool, tree: ast.AST) -> list[tuple[str, int]]:
    """(dotted name, line) of every import in the module; for `from a import b`, both a and a.b (b may be a module)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found += [(origin, node.lineno)] + [(f"{origin}.{a.name}", node.lineno) for a in node.names]
    return found


def import_graph(packages: dict[str, Path]) -> dict[str, dict[str, int]]:
    """Module -> {module it imports: line of the first such import}, within the given packages only."""
    files = module_files(packages)
    graph: dict[str, dict[str, int]] = {m: {} for m in files}
    for module, f in files.items():
        tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
        for name, line in imported_names(module, f.name == "__init__.py", tree):
            if name in files and name != module:
                graph[module].setdefault(name, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) through each group of modules that import each other, found by depth-first search."""
    found: list[list[str]] = []
    state: dict[str, str] = {}  # "open" while on the search path, "done" after
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = "open"
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                found.append(path[path.index(n) :] + [n])
            elif n not in state:
                visit(n)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def describe(cycle: list[str], graph: dict[str, dict[str, int]], files: dict[str, Path]) -> str:
    """"a -> b -> a" and, for each step, the file and line of the import."""
    where = lambda m: files[m].relative_to(ROOT) if files[m].is_relative_to(ROOT) else files[m]  # noqa: E731
    steps = [f"{where(a)}:{graph[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + ":\n    " + "\n    ".join(steps)


def test_the_modules_import_each_other_without_a_cycle() -> None:
    graph = import_graph(PACKAGES)
    assert {"farense.train", "farense.stages", "tasks.stages", "flows.pipeline"} <= set(graph)
    assert "farense.distributed" in graph["farense.train"], "the graph sees farense's own imports"
    found = cycles(graph)
    files = module_files(PACKAGES)
    assert not found, "import cycles:\n" + "\n".join(describe(c, graph, files) for c in found)


def test_a_cycle_through_a_function_level_import_is_found_and_named(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from pkg import c\n    return c.h()\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    (pkg / "d.py").write_text("import pkg.a\n")  # leads into the cycle, is not part of it
    graph = import_graph({"pkg": pkg})
    assert graph["pkg.c"] == {"pkg": 3, "pkg.a": 3}  # `from . import a`: the package, then a
    (cycle,) = cycles(graph)
    assert cycle == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert describe(cycle, graph, module_files({"pkg": pkg})).startswith("pkg.a -> pkg.b -> pkg.c -> pkg.a:")
    assert "pkg/b.py:2 imports pkg.c" in describe(cycle, graph, module_files({"pkg": pkg}))

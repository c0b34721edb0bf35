"""Claims about the package's shape: imports go only downward (issue 9, item 1).

The import graph is read from the source with ``ast`` (nothing is imported): every ``import`` and ``from ... import``
inside ``vramcalc/``, at module level or inside a function, is an edge to the ``vramcalc`` module it names. A
``from package import name`` where ``package.name`` is a module is an edge to that module; the implicit import of
a parent package's ``__init__`` is not counted (every submodule has it, and it is not a dependency of the code).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = "vramcalc"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
ENTRY_POINTS = {"vramcalc.cli", "vramcalc.__main__"}  # the shell over the library: only these may import the CLI


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under ``root`` (a package's ``__init__`` is the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, target: str | None, level: int) -> str:
    """The absolute name of a relative import's base (``from ..x import y`` in ``a.b.c`` -> ``a.x``)."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph(files: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in its body)."""
    files = module_files() if files is None else files
    graph = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.module, node.level)
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.append(submodule if submodule in files else base)
                # importing from a subpackage runs its __init__ first (the top package, which re-exports the
                # public API, is left out: every module is reached through it)
                if "." in base and base in files and files[base].name == "__init__.py":
                    targets.append(base)
            for target in targets:
                while target and target not in files:  # `import vramcalc.terms.x` of a name we do not hold
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None when the graph is acyclic (depth-first search, three colours)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {node: WHITE for node in graph}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for neighbour in sorted(graph.get(node, ())):
            if colour.get(neighbour, WHITE) == GREY:
                return stack[stack.index(neighbour):] + [neighbour]
            if colour.get(neighbour, WHITE) == WHITE:
                found = visit(neighbour)
                if found:
                    return found
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE:
            found = visit(node)
            if found:
                return found
    return None


# -- the finder itself can fail ------------------------------------------------------------------------------------
@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),  # a diamond is not a cycle
    ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
    ({"a": {"a"}}, ["a", "a"]),
])
def test_the_cycle_finder_finds_exactly_the_cycles(graph, cycle):
    assert find_cycle(graph) == cycle


def test_the_graph_builder_sees_relative_lazy_and_submodule_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import f\n")
    (package / "a.py").write_text("def f():\n    from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("from .. import a\nimport pkg.sub\n")
    graph = import_graph(module_files(package))
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub", "pkg.sub.b"}, "pkg.sub": set(),
                     "pkg.sub.b": {"pkg.a", "pkg.sub"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]


# -- the package -----------------------------------------------------------------------------------------------------
@functools.cache
def package_graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_package_has_no_import_cycle():
    assert find_cycle(package_graph()) is None


def test_no_library_module_imports_the_cli():
    graph = package_graph()
    offenders = sorted(name for name, targets in graph.items()
                       if "vramcalc.cli" in targets and name not in ENTRY_POINTS)
    assert offenders == []

"""The frontend's modules import one another without a circle, and its two APIs stay apart.

The graph is read from the source with `ast`, so imports under `if TYPE_CHECKING:` and inside
functions count as edges too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "frontend"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE
Graph = dict[str, set[str]]


def imported_modules(tree: ast.Module) -> set[str]:
    """Every module of the package that `tree` imports, by its name within the package."""
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            base = f"{PACKAGE}.{node.module}" if node.module else PACKAGE
            imported |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name.split(".")[1] for name in imported if name.startswith(f"{PACKAGE}.")}


def import_graph() -> Graph:
    modules = {path.stem: path for path in PACKAGE_DIR.glob("*.py")}
    return {name: imported_modules(ast.parse(path.read_text())) & modules.keys() - {name}
            for name, path in modules.items()}


def find_cycle(graph: Graph) -> list[str] | None:
    """One import circle (its modules in order, the first repeated at the end), or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for imported in sorted(graph[module]):
            cycle = visit(imported, path + [module])
            if cycle is not None:
                return cycle
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module, [])) is not None), None)


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert {"grpc_api", "openai_api", "generation_service"} <= graph["server"]
    assert "generation_service" in graph["grpc_api"] and "generation_service" in graph["openai_api"]


def test_the_frontend_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_cycle_finder_sees_a_circle_through_a_type_checking_import():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from frontend.a import A\n"
    graph = {"a": {"b"}, "b": imported_modules(ast.parse(source))}
    assert find_cycle(graph) == ["a", "b", "a"]


def test_neither_api_imports_the_other():
    graph = import_graph()
    assert "openai_api" not in graph["grpc_api"] and "grpc_api" not in graph["openai_api"]
    assert "server" not in graph["openai_api"] | graph["grpc_api"] | graph["generation_service"]

"""The package's module layout: no import cycles between cifarcnn's modules, counting every import (module level
and inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cifarcnn"


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The cifarcnn modules `path` imports anywhere in its code ("__init__" for the package itself)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names if a.name.split(".")[0] == "cifarcnn"]
            found |= {parts[1] if len(parts) > 1 else "__init__" for parts in names}
        elif isinstance(node, ast.ImportFrom):
            parts = node.module.split(".") if node.module else []
            if node.level == 0:
                if parts[:1] != ["cifarcnn"]:
                    continue  # another package
                parts = parts[1:]
            elif node.level > 1:
                continue  # above the package (it has no subpackages with modules)
            if parts:
                found.add(parts[0])
            else:  # `from . import x`: a submodule, or a name from __init__
                found |= {a.name if a.name in modules else "__init__" for a in node.names}
    return found & modules


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {name: imported_modules(PACKAGE / f"{name}.py", modules) - {name} for name in sorted(modules)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_every_form_of_intra_package_import_is_seen(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nimport cifarcnn.a\nfrom . import b, __version__\nfrom .c import x\n"
                      "from cifarcnn.d import y\nfrom cifarcnn import e\nfrom numpy import f\n"
                      "def g():\n    from .h import z\n")
    modules = {"__init__", "a", "b", "c", "d", "e", "f", "h"}
    assert imported_modules(source, modules) == {"__init__", "a", "b", "c", "d", "e", "h"}


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "config" in graph["cli"] and "train" in graph["cli"]  # module level, and inside a function
    assert "__init__" in graph["export"]  # from . import __version__
    assert "model" in graph["config"]  # imported inside make_config


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_between_cifarcnn_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)

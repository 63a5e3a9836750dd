"""The package layout: one folder per job, imports running one way (command line -> reports -> use -> training
-> data -> base -> models), and no import cycle between files, counting every import (module level and inside
functions); and docs/development.md's layout table naming every module of each folder, and no other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cifarcnn"
# Lowest first: a module may import its own layer and the layers below it, never one above.
LAYERS = ("models", "base", "data", "training", "use", "reports", "cli")
TOP_LEVEL = {"cli": "cli", "__main__": "cli", "__init__": "base"}  # the root __init__ only reads the version
LAYOUT_PAGE = PACKAGE.parent / "docs" / "development.md"


def all_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module names below the package ("base.config", "data.__init__", "cli", "__init__") and their
    files."""
    return {".".join(p.relative_to(package).with_suffix("").parts): p for p in package.rglob("*.py")}


def resolve(name: str, modules: set[str]) -> str:
    """A dotted name inside the package as the module that holds it: the module itself, or its package's
    __init__ (a package, or a name taken from one)."""
    if name in modules:
        return name
    init = f"{name}.__init__" if name else "__init__"
    if init in modules:
        return init
    return resolve(name.rpartition(".")[0], modules)


def imported_modules(path: Path, module: str, modules: set[str]) -> set[str]:
    """The package's modules that `module` (its file at `path`) imports anywhere in its code."""
    package = module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {resolve(a.name.partition(".")[2], modules) for a in node.names
                      if a.name.split(".")[0] == "cifarcnn"}
        elif isinstance(node, ast.ImportFrom):
            parts = node.module.split(".") if node.module else []
            if node.level == 0:
                if parts[:1] != ["cifarcnn"]:
                    continue  # another package
                base = parts[1:]
            else:
                base = package[:len(package) - (node.level - 1)] + parts
            for alias in node.names:  # `from X import name`: name is a submodule of X, or a name in X
                found.add(resolve(".".join(base + [alias.name]), modules))
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    files = all_modules(package)
    return {name: imported_modules(path, name, set(files)) - {name} for name, path in sorted(files.items())}


def layer(module: str) -> str:
    head = module.split(".")[0]
    return TOP_LEVEL[head] if "." not in module else head


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a lower layer to a higher one, as 'a -> b'."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    return [f"{a} -> {b}" for a, targets in graph.items() for b in sorted(targets)
            if rank[layer(b)] > rank[layer(a)]]


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    folders: dict[str, set[str]] = {layer(m): set() for m in graph}
    for a, targets in graph.items():
        folders[layer(a)] |= {layer(b) for b in targets} - {layer(a)}
    return folders


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
    package = tmp_path / "cifarcnn"
    for name in ("__init__", "cli", "base/__init__", "base/a", "base/b", "data/__init__", "data/c", "data/d",
                 "training/__init__", "training/e", "training/f"):
        (package / f"{name}.py").parent.mkdir(parents=True, exist_ok=True)
        (package / f"{name}.py").write_text("")
    (package / "training/m.py").write_text(
        "import os\nimport cifarcnn.base.a\nfrom . import e\nfrom .f import x\nfrom .. import __version__\n"
        "from ..data import c\nfrom ..data.d import y\nfrom cifarcnn.base import b\nfrom numpy import f\n"
        "def g():\n    from ..data import z\n")
    graph = import_graph(package)
    assert graph["training.m"] == {"base.a", "training.e", "training.f", "__init__", "data.c", "data.d",
                                   "base.b", "data.__init__"}


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    # module level, inside a function
    assert "base.config" in graph["cli"] and "training.train" in graph["cli"]
    assert "__init__" in graph["use.export"]  # from .. import __version__
    assert "models.registry" in graph["base.config"]  # imported inside make_config


def test_the_checks_find_an_upward_import_and_a_cycle():
    graph = {"base.a": {"data.b"}, "data.b": {"base.a"}, "cli": {"reports.r"}, "reports.r": set()}
    assert upward_imports(graph) == ["base.a -> data.b"]
    assert find_cycle(folder_graph(graph)) == ["base", "data", "base"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_lives_in_a_job_folder():
    for module in all_modules():
        where = f"cifarcnn/{module.replace('.', '/')}.py"
        assert layer(module) in LAYERS, f"{where} is in no layer folder {LAYERS}"
    assert import_graph()["__init__"] == set(), "the package's __init__ must import nothing of the package"


def test_imports_run_one_way_between_the_job_folders():
    graph = import_graph()
    assert upward_imports(graph) == [], f"imports from a lower layer to a higher one (order {LAYERS})"
    cycle = find_cycle(folder_graph(graph))
    assert cycle is None, "import cycle between folders: " + " -> ".join(cycle)


def test_no_import_cycles_between_cifarcnn_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def layout_table(page: str) -> dict[str, list[str]]:
    """The rows of the page's package layout table, top first: folder below the package ("" for its top level)
    -> the names in backticks in the row's modules column (identifiers only, not `python -m cifarcnn`)."""
    rows = {}
    for line in page.split("## Package layout", 1)[-1].split("\n## ", 1)[0].splitlines():
        if match := re.fullmatch(r"\| `cifarcnn/(?:(\w+)/)?` \| (.*) \|", line):
            rows[match[1] or ""] = re.findall(r"`(\w+)`", match[2])
    return rows


def test_the_layout_table_names_every_module_of_each_folder_and_no_other():
    table = layout_table(LAYOUT_PAGE.read_text(encoding="utf-8"))
    assert list(table) == ["" if name == "cli" else name for name in reversed(LAYERS)], (
        "docs/development.md: one row per layer folder, top layer first")
    modules: dict[str, set[str]] = {}
    for module in all_modules():
        folder, _, name = module.rpartition(".")
        if name != "__init__":
            modules.setdefault(folder, set()).add(name)
    for folder, named in table.items():
        where = f"docs/development.md's row for cifarcnn/{folder + '/' if folder else ''}"
        assert len(named) == len(set(named)), f"{where} names a module twice: {named}"
        assert not modules[folder] - set(named), f"{where} leaves out {sorted(modules[folder] - set(named))}"
        unknown = sorted(set(named) - modules[folder])
        assert not unknown, f"{where} names no such module: {unknown}"

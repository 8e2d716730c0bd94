"""The modules of ``common/`` import one another without a cycle, counting the imports made only
for type checking (``if TYPE_CHECKING:``) and those inside functions: each module can then be read,
and tested, knowing only the modules below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parent.parent / "common"
PACKAGE = "rdzv_common"


def import_graph(package_dir: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module name -> the modules of the same package it imports, found in its source (every
    ``import``/``from ... import`` anywhere in it, relative or by the package's name)."""
    modules = {path.stem for path in package_dir.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name in modules:
        edges: set[str] = set()
        tree = ast.parse((package_dir / f"{name}.py").read_text(), filename=f"{name}.py")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    base = node.module
                elif node.level == 0 and node.module and node.module.split(".")[0] == package:
                    base = node.module.partition(".")[2] or None
                else:
                    continue
                if base is None:  # ``from . import x``: x is a module, or a name of ``__init__``
                    edges |= {alias.name if alias.name in modules else "__init__" for alias in node.names}
                else:
                    edges.add(base.split(".")[0])
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == package:
                        edges.add(parts[1] if len(parts) > 1 else "__init__")
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or ``None``."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph.get(module, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def test_common_has_no_import_cycle():
    graph = import_graph(COMMON)
    assert len(graph) >= 20 and graph["handler"] >= {"executor", "state", "settings"}  # it read them all
    cycle = find_cycle(graph)
    assert cycle is None, "common/ imports in a cycle: " + " -> ".join(cycle)


def test_the_core_below_the_handler_never_imports_it():
    # Only the package's ``__init__`` imports the handler: everything else lies below it.
    graph = import_graph(COMMON)
    assert {module for module, targets in graph.items() if "handler" in targets} == {"__init__"}


def _package(tmp_path: Path, sources: dict[str, str]) -> Path:
    for name, source in sources.items():
        (tmp_path / f"{name}.py").write_text(source)
    return tmp_path


def test_a_cycle_under_type_checking_counts(tmp_path):
    package = _package(
        tmp_path,
        {
            "__init__": "",
            "a": "from .b import B\n",
            "b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import C\n",
            "c": "def f():\n    from rdzv_common.a import A\n",
        },
    )
    assert find_cycle(import_graph(package)) == ["a", "b", "c", "a"]


@pytest.mark.parametrize(
    "sources",
    [
        {"state": "from . import ranks\n", "ranks": "from .state import NodeDesc\n"},
        {"x": "import rdzv_common.y\n", "y": "from rdzv_common import x\n"},
    ],
)
def test_every_form_of_import_counts(tmp_path, sources):
    package = _package(tmp_path, {"__init__": "", **sources})
    assert find_cycle(import_graph(package)) is not None


def test_imports_of_other_packages_and_of_the_init_alone_are_no_cycle(tmp_path):
    package = _package(
        tmp_path,
        {
            "__init__": "from .a import A\n",
            "a": "import json\nfrom etcd_rdzv.keys import RunKeys\nfrom .b import B\n",
            "b": "from torch.distributed import Store\n",
        },
    )
    graph = import_graph(package)
    assert graph == {"__init__": {"a"}, "a": {"b"}, "b": set()}
    assert find_cycle(graph) is None

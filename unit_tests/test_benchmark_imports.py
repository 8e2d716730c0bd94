"""The benchmarks share no code with the tests: nothing under ``benchmarks/`` imports
``integration_tests`` or ``unit_tests`` (what both need, such as the answer and invariant
checkers, lives in ``benchmarks/`` and the tests import it from there)."""

from __future__ import annotations

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TESTS = ("integration_tests", "unit_tests")


def imports_of_the_tests(source: str, filename: str = "<source>") -> list[str]:
    """Every import of a test package in ``source``, at any depth (functions included)."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"line {node.lineno}: {name}" for name in names if name.split(".")[0] in TESTS]
    return sorted(found)


def test_no_benchmark_imports_the_tests():
    found = {
        path.name: imports
        for path in sorted(BENCHMARKS.rglob("*.py"))
        if (imports := imports_of_the_tests(path.read_text(), str(path)))
    }
    assert len(list(BENCHMARKS.glob("*.py"))) >= 10  # it read them
    assert found == {}


def test_every_form_of_import_is_seen():
    source = (
        "import integration_tests.agents\n"
        "from unit_tests import torch_channels\n"
        "from .answers import check\n"
        "import etcd_rdzv\n"
        "def f():\n"
        "    from integration_tests.invariants import etcd_client\n"
    )
    assert imports_of_the_tests(source) == [
        "line 1: integration_tests.agents",
        "line 2: unit_tests",
        "line 6: integration_tests.invariants",
    ]

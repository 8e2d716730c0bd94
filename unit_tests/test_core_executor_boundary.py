"""The handler acts on the shared state only through its ``OpExecutor``: it hands the
``StateHolder`` it builds to the executor and never touches it again, and no code of the package
reaches into another object's ``_executor`` (the heartbeat thread calls the handler's own method).
Read from the source, so a shortcut added anywhere shows up here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "etcd_rdzv", "c10d_rdzv")


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def holder_uses(tree: ast.Module) -> list[str]:
    """Every place that reads a holder (the name ``holder``, or an attribute ``_holder``), except
    as an argument of the ``OpExecutor`` call that takes it over."""
    handed_over = {
        id(arg)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "OpExecutor"
        for arg in [*node.args, *(keyword.value for keyword in node.keywords)]
    }
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "holder" and isinstance(node.ctx, ast.Load):
            if id(node) not in handed_over:
                uses.append((node.lineno, "holder"))
        elif isinstance(node, ast.Attribute) and node.attr == "_holder":
            uses.append((node.lineno, ast.unparse(node)))
    return [f"line {line}: {text}" for line, text in sorted(uses)]


def foreign_executor_reads(tree: ast.Module) -> list[str]:
    """Every ``x._executor`` whose ``x`` is not ``self``."""
    reads = [
        (node.lineno, ast.unparse(node))
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "_executor"
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    ]
    return [f"line {line}: {text}" for line, text in sorted(reads)]


def test_the_handler_hands_its_holder_to_the_executor_and_never_uses_it():
    tree = _tree(ROOT / "common" / "handler.py")
    assert "StateHolder" in ast.unparse(tree)  # it does build one
    assert holder_uses(tree) == []


def test_no_code_of_the_package_reaches_into_another_objects_executor():
    found = {
        str(path.relative_to(ROOT)): reads
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if (reads := foreign_executor_reads(_tree(path)))
    }
    assert found == {}


def test_the_checks_see_the_shortcuts_they_forbid():
    shortcuts = ast.parse(
        "class H:\n"
        "    def __init__(self):\n"
        "        holder = StateHolder()\n"
        "        self._holder = holder\n"
        "        self._executor = OpExecutor(node, holder)\n"
        "    def poll(self):\n"
        "        holder.read()\n"
        "def loop(handler):\n"
        "    handler._executor.beat()\n"
    )
    assert holder_uses(shortcuts) == ["line 4: holder", "line 4: self._holder", "line 7: holder"]
    assert foreign_executor_reads(shortcuts) == ["line 9: handler._executor"]
    clean = ast.parse(
        "class H:\n"
        "    def __init__(self):\n"
        "        holder = StateHolder()\n"
        "        self._executor = OpExecutor(node, holder, settings=s)\n"
        "    def poll(self):\n"
        "        self._executor.read()\n"
    )
    assert holder_uses(clean) == [] and foreign_executor_reads(clean) == []

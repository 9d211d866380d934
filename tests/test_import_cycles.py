"""No import cycles between the modules of one package (function-level imports included).

A cycle (calibration/qdq.py <-> calibration/weight_only.py was one, issue #10) forces a lazy
import inside a function and makes the import order matter.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _graph(package: Path) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}`` by relative-import targets."""
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        deps = graph.setdefault(name, set())
        base = rel.parts[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = list(base[: len(base) - node.level + 1])
                if node.module:
                    deps.add(".".join([*parts, *node.module.split(".")]))
                else:
                    deps.update(".".join([*parts, a.name]) for a in node.names)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return [*stack[stack.index(d):], d]
            if d in graph and d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


@pytest.mark.parametrize("package", ["runtime", "calibration", "exporter"])
def test_no_import_cycles(package: str) -> None:
    cycle = _cycle(_graph(ROOT / package))
    assert cycle is None, " -> ".join(cycle or [])


def test_the_check_sees_a_cycle(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import y\n")
    assert _cycle(_graph(tmp_path)) == ["a", "b", "a"]

"""The package's layout stays as designed: data flows one way, so imports never go in a circle.

Every import counts, also those inside functions (the package imports heavy libraries lazily,
and a lazy import back up the flow is still a circle). The faces (cli, server, demo,
visualize) use the core; the core never imports a face.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "multiretrieval"
FACES = ("multiretrieval.cli", "multiretrieval.server", "multiretrieval.demo", "multiretrieval.visualize")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The package modules a file imports (absolute or relative, at any depth)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("multiretrieval")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("multiretrieval"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}  # `from . import x` imports module x
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for target in imports_of(path):
            while target and target not in modules:  # `from .x import name`: the module is x
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != name and target != "multiretrieval":  # the lazy __init__ re-exports, imports nothing eagerly
                targets.add(target)
        edges[name] = targets
    return edges


def test_no_import_cycle(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_core_never_imports_a_face(graph):
    def is_face(name: str) -> bool:
        return any(name == f or name.startswith(f + ".") for f in FACES)

    wrong = sorted(f"{a} -> {b}" for a, targets in graph.items() if not is_face(a) for b in targets if is_face(b))
    assert not wrong, wrong


def test_the_graph_sees_the_imports(graph):
    """The checks above are only as good as the graph: it must see lazy and relative imports."""
    assert "multiretrieval.embedder" in graph["multiretrieval.retriever"]
    assert "multiretrieval.encoders.clip" in graph["multiretrieval.embedder"]  # imported inside a method
    assert "multiretrieval.retriever" in graph["multiretrieval.server.service"]  # `from ..retriever import`

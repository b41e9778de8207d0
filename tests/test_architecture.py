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


# ---------------------------------------------------------------- the search options: one declaration (query/options.py)

FACE_FILES = [PACKAGE / "cli.py", *sorted((PACKAGE / "server").rglob("*.py"))]


def search_options() -> tuple[str, ...]:
    from multiretrieval.query.options import option_names

    return option_names()


def test_a_search_option_is_declared_only_in_search_options():
    """The command line's search flags and the service's request fields come from SearchOptions: a search flag
    written out (add_argument("--offset", ...) for `multiretrieval search`) or a request field named like an option
    (create_model(..., offset=...), a request model's `offset: int`) would drift from it."""
    options = set(search_options())
    flags = {"--" + name.replace("_", "-") for name in options} | {"--" + name for name in options}
    found = []
    for path in FACE_FILES:
        command = None  # the sub-command whose arguments follow (cli.py: p = sub.add_parser("search", ...))
        for node in sorted((n for n in ast.walk(ast.parse(path.read_text())) if hasattr(n, "lineno")),
                           key=lambda n: (n.lineno, n.col_offset)):
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            name = getattr(node.func, "id", getattr(node.func, "attr", "")) if isinstance(node, ast.Call) else ""
            if name == "add_parser" and node.args and isinstance(node.args[0], ast.Constant):
                command = node.args[0].value
            elif name == "add_argument" and command in ("search", None):
                found += [f"{where}: the flag {a.value!r}" for a in node.args if isinstance(a, ast.Constant) and a.value in flags]
            elif name == "create_model":
                found += [f"{where}: request field {k.arg!r}" for k in node.keywords if k.arg in options]
            elif isinstance(node, ast.ClassDef) and node.name.endswith("Request"):
                found += [f"{where}: field {f.target.id!r} of {node.name}" for f in node.body
                          if isinstance(f, ast.AnnAssign) and isinstance(f.target, ast.Name) and f.target.id in options]
    assert not found, "search options declared outside query/options.py (SearchOptions): " + "; ".join(found)


def test_the_modes_and_hybrid_methods_are_named_once():
    """MODES and HYBRID_METHODS are spelled out in query/options.py only: a list of them anywhere else (a tuple, a
    Literal, argparse choices) is a second declaration that can drift."""
    from multiretrieval.query.options import HYBRID_METHODS, MODES

    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "query" / "options.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                words = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                for name, names in (("MODES", MODES), ("HYBRID_METHODS", HYBRID_METHODS)):
                    if len(words & set(names)) >= max(3, len(names) - 1):  # ("image", "text", "fused") is not MODES
                        found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {name} spelled out")
    assert not found, "; ".join(found)

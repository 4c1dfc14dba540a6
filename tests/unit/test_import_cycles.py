"""No import cycle inside megatron_harpe, lazy (function-level) imports included.

Every `import` / `from ... import` statement anywhere in a module counts, so a cycle hidden by
moving one side's import into a function body (or under `if TYPE_CHECKING:`) still fails here.
`from pkg import name` is an import of the submodule `pkg.name` when that submodule exists, else
of `pkg` itself (its `__init__`): a module importing a sibling through its package therefore
depends on the sibling, not on the package's `__init__`, which may re-export that module's own
names. Run: pytest tests/unit/test_import_cycles.py
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "megatron_harpe"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE


def module_files(root: Path) -> dict[str, Path]:
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The package modules `module` imports, each with the line of its first import."""
    is_package = path.name == "__init__.py"
    found: dict[str, int] = {}

    def add(target: str | None, line: int) -> None:
        if target is not None and target != module:
            found.setdefault(target, line)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(_owner(alias.name, modules), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = module.split(".") if is_package else module.split(".")[:-1]
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in modules else _owner(base, modules), node.lineno)
    return found


def import_knots(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each one or more cycles), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(start: str) -> None:  # iterative Tarjan: no recursion limit on deep graphs
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            advanced = False
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a closed path of modules) per knot."""
    return [_cycle_within(knot, graph) for knot in import_knots(graph)]


def _cycle_within(component: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """A shortest closed path through the component's first module (breadth-first)."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt not in members:
                    continue
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle found in the component {component}")


def module_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join([*steps, cycle[-1]])


def test_no_import_cycles():
    graph = module_graph()
    assert len(graph) > 50, "the package's modules were not found"
    knots = import_knots(graph)
    report = [
        f"{_describe(_cycle_within(knot, graph), graph)}\n    ({len(knot)} modules import each other"
        f" in this knot: {', '.join(knot)})"
        for knot in knots
    ]
    assert not knots, "import cycles inside megatron_harpe (lazy imports count):\n" + "\n".join(report)


def test_the_graph_sees_lazy_relative_and_submodule_imports(tmp_path):
    """The parser itself: a cycle made of a function-level relative import is found."""
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from megatron_harpe.sub.b import thing\n")
    (package / "sub" / "a.py").write_text("def f():\n    from . import b\n")
    (package / "sub" / "b.py").write_text("from megatron_harpe.sub import a\nthing = 1\n")
    (package / "c.py").write_text("from megatron_harpe.sub import thing\n")
    graph = module_graph(package)
    assert graph["megatron_harpe.sub.a"] == {"megatron_harpe.sub.b": 2}
    assert graph["megatron_harpe.sub.b"] == {"megatron_harpe.sub.a": 1}
    assert graph["megatron_harpe.c"] == {"megatron_harpe.sub": 1}
    assert graph["megatron_harpe.sub"] == {"megatron_harpe.sub.b": 1}
    assert find_cycles(graph) == [["megatron_harpe.sub.a", "megatron_harpe.sub.b", "megatron_harpe.sub.a"]]

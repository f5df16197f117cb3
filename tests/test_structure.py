"""The package's structure: which module may import which (no import circles but the method registry's own
plugin import; the training and evaluation readers import nothing of the shard converter)."""
from __future__ import annotations

import ast
from pathlib import Path

from launch import REPO_ROOT

PACKAGE = REPO_ROOT / "dsmoe"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the dsmoe modules it imports anywhere in its text (top level, in functions, under
    TYPE_CHECKING); the registry's built-in method packages count as its imports."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules), None)

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                module = resolve(target) if target.startswith("dsmoe") else None
                if module and module != name:
                    graph[name].add(module)
    from dsmoe.methods.registry import BUILT_IN

    graph["dsmoe.methods.registry"].update(BUILT_IN)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_but_the_method_registrys_plugin_import():
    graph = import_graph()
    assert graph["dsmoe.methods.registry"] == {"dsmoe.schema", "dsmoe.methods.dm_adapter", "dsmoe.methods.dasd",
                                               "dsmoe.methods.baselines"}
    with_plugins = cycles(graph)
    assert all("dsmoe.methods.registry" in component for component in with_plugins), with_plugins
    graph["dsmoe.methods.registry"] = {"dsmoe.schema"}  # without the registry's own plugin import: no circle
    assert cycles(graph) == []


def test_the_readers_import_nothing_of_the_converter():
    graph = import_graph()
    readers = [name for name in graph if name.startswith("dsmoe.data")]
    reached, todo = set(), list(readers)
    while todo:
        for target in graph[todo.pop()] - reached:
            reached.add(target)
            todo.append(target)
    assert not {name for name in reached if name.startswith("dsmoe.shards")}, sorted(reached)


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

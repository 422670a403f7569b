"""okd's modules import each other without a circle, and the lower layers stay below the upper ones.

The graph is read statically with ``ast``: every ``import`` and ``from ... import`` of an okd module
counts, wherever it stands: at the top, inside a function, or under ``if TYPE_CHECKING:``. ``from
okd.pkg import name`` is an edge to ``okd.pkg.name`` when that is a module, else to ``okd.pkg``. A
module's own packages (whose ``__init__`` Python runs first) are not counted as imported by it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import okd

OKD_DIR = Path(okd.__file__).parent


def module_files(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of the package at ``root`` (a package is named by its ``__init__``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names ``node`` imports (for ``from X import a, b``: ``X.a`` and ``X.b``, and ``X``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: resolved against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: the package's modules it imports}`` for the package at ``root``."""
    modules = module_files(root)

    def resolve(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = set()
        for node in ast.walk(tree):
            names = _imported(node, module, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom) and names:
                base, members = names[0], names[1:]
                submodules = [m for m in members if m in modules]  # `from pkg import submodule`
                names = submodules + ([base] if len(submodules) < len(members) else [])
            targets.update(filter(None, map(resolve, names)))
        targets.discard(module)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], set[str]]]:
    """``(cycle, modules)`` per strongly connected component of more than one module: one cycle through it
    (``[a, b, ..., a]``) and all the modules it ties together."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm; okd's graph is far shallower than the recursion limit
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(_cycle_through(graph, component), component) for component in components]


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle from the component's first module back to it, inside the component."""
    start = min(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & component):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    raise AssertionError("a strongly connected component without a cycle")


def describe(found: list[tuple[list[str], set[str]]]) -> str:
    return "; ".join(
        " -> ".join(cycle) + (f" (a circle of {len(modules)}: {', '.join(sorted(modules))})" if len(modules) > len(cycle) - 1 else "")
        for cycle, modules in found
    )


GRAPH = import_graph(OKD_DIR)


def imports_of(module: str) -> set[str]:
    return GRAPH[module]


def test_no_import_cycle_among_okds_modules():
    found = cycles(GRAPH)
    assert not found, f"{len(found)} import cycle(s) among okd's modules: {describe(found)}"


def test_the_walk_sees_type_only_and_function_local_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .b import thing\n")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.b import thing\n")
    (package / "sub" / "b.py").write_text("def thing():\n    from .. import a\n    return a\n")
    (package / "c.py").write_text("import pkg.sub\n")
    graph = import_graph(package)
    assert graph == {"pkg": set(), "pkg.sub": {"pkg.sub.b"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub.b": {"pkg.a"}, "pkg.c": {"pkg.sub"}}
    assert describe(cycles(graph)) == "pkg.a -> pkg.sub.b -> pkg.a"


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------

REGISTRIES = ("okd.sources", "okd.online", "okd.divergences")


def _inside(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_floor_imports_nothing_from_okd():
    assert imports_of("okd.targets") == set()
    assert imports_of("okd.divergences") == set()
    assert imports_of("okd.io") == set()


def test_the_sections_import_no_registry_that_reads_them():
    # okd.sections checks online.divergence against the divergences, which import nothing from okd.
    assert imports_of("okd.sections") <= {"okd.divergences"}


def test_config_assembles_sections_and_no_registry_imports_config_or_methods():
    # The online section lives beside the registry of module kinds it names (okd.online.base).
    assert imports_of("okd.config") <= {"okd.sections", "okd.methods", "okd.minillm", "okd.online.base"}
    for module in GRAPH:
        if _inside(module, (*REGISTRIES, "okd.losses", "okd.heads", "okd.fused", "okd.minillm", "okd.data")):
            upward = imports_of(module) & {"okd.config", "okd.methods"}
            assert not upward, f"{module} imports {sorted(upward)}: take the plain sections from okd.sections"


def test_data_records_lie_below_reading_and_tokenising():
    assert imports_of("okd.data.records") == set()
    assert "okd.data.instruction" not in imports_of("okd.data.loading")


def _definitions(name: str) -> list[str]:
    """The modules that define ``name`` at their top level (a def, a class or an assignment of a literal)."""
    found = []
    for module, path in module_files(OKD_DIR).items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                found.append(module)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, (ast.Constant, ast.UnaryOp)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    found.append(module)
    return found


@pytest.mark.parametrize("name", ["IGNORE_INDEX", "next_token_targets", "loss_positions", "example_loss_positions", "mix_losses"])
def test_token_targets_are_defined_once_in_the_floor(name):
    assert _definitions(name) == ["okd.targets"]

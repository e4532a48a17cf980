"""The package's module graph has no cycle, counting imports made inside functions too (a lazy
import is still a dependency); each dtype list and argument check is defined once."""

from __future__ import annotations

import ast
import pathlib

import fdistill

PACKAGE = pathlib.Path(fdistill.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, name: str, modules: set[str]) -> set[str]:
    """The package modules that ``name`` imports (resolved relative imports; ``from . import x``
    names the submodule x when there is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: _imports(path, name, modules) for name, path in files.items()}


def _is_package_init(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def test_no_import_cycles():
    """Depth-first search for a back edge. A package's ``__init__`` re-exporting its submodules is
    not a dependency of those submodules on each other, so edges into an ``__init__`` from inside
    the same package are left out (Python imports the parent package first anyway)."""
    graph = _graph()
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not (_is_package_init(d) and name.startswith(d + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_shared_definitions_are_defined_once():
    """The float dtypes the losses accept, and the argument checks, live in fdistill.validation."""
    for name in ("FLOAT_DTYPES =", "def check_labels(", "def check_real(", "def check_choice(",
                 "def check_temperature("):  # fmt: skip
        owners = [p.name for p in PACKAGE.rglob("*.py") if name in p.read_text()]
        assert owners == ["validation.py"], (name, owners)

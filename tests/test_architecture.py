"""The layout's rules, checked on the source: every module imports first, the layers import only
downwards (nothing imports the CLI), the import graph has no cycle, and a method's name lives in the
registry alone."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

import jointrag
from jointrag.methods import METHODS

PACKAGE = Path(jointrag.__file__).parent
REGISTRY = PACKAGE / "methods" / "__init__.py"

# bottom to top; a module may import from its own layer's modules and from the layers beneath
LAYERS = [
    {"jointrag.errors", "jointrag.types", "jointrag.runtime", "jointrag.io", "jointrag.maths",
     "jointrag.metrics", "jointrag.memory", "jointrag.distributed", "jointrag.models"},
    {"jointrag.data"},
    {"jointrag.retrieval", "jointrag.generation"},
    {"jointrag.system"},
    {"jointrag.methods"},
    {"jointrag.config"},
    {"jointrag.evaluation"},
    {"jointrag.train", "jointrag.export"},  # export loads a checkpoint as training's load_trained does
    # the package root re-exports the Python API on first use (its `__getattr__`); the modules beneath only
    # read `__version__` from it, which is not counted as an import (importing any of them runs it first)
    {"jointrag", "jointrag.api"},
    {"jointrag.serve"},
    {"jointrag.cli", "jointrag.__main__"},
]
SIDEWAYS = {("jointrag.retrieval", "jointrag.generation"), ("jointrag.generation", "jointrag.retrieval")}  # same layer, kept apart


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def group(module: str) -> str:
    """The unit a layer lists: a top-level module, or a subpackage with everything in it."""
    return ".".join(module.split(".")[:2])


def layer(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if group(module) in names)


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules `module` imports anywhere in its body (functions included, `if TYPE_CHECKING`
    blocks excluded), with the packages whose `__init__` such an import runs."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _type_checking(node) for n in ast.walk(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            if not name.startswith("jointrag"):
                continue
            parts = name.split(".")
            # importing a.b.c runs the __init__ of a and a.b first, unless they are already being imported
            for n in range(1, len(parts) + 1):
                target = ".".join(parts[:n])
                if target in known and not module.startswith(target + ".") and target != module:
                    targets.add(target)
    return targets


def graph() -> dict[str, set[str]]:
    known = modules()
    return {module: imports(module, path, known) for module, path in known.items()}


def test_every_module_imports_first():
    """Each module imported into a fresh set of jointrag modules (third-party ones stay loaded);
    `__main__` runs the CLI when imported, so only its import of the CLI is checked (by the graph)."""
    saved = {name: module for name, module in sys.modules.items() if name == "jointrag" or name.startswith("jointrag.")}
    try:
        for module in [m for m in modules() if m != "jointrag.__main__"]:
            for name in [n for n in sys.modules if n == "jointrag" or n.startswith("jointrag.")]:
                del sys.modules[name]
            importlib.import_module(module)
    finally:
        for name in [n for n in sys.modules if n == "jointrag" or n.startswith("jointrag.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_every_module_has_a_layer():
    assert [m for m in modules() if not any(group(m) in names for names in LAYERS)] == []


def test_nothing_below_the_cli_imports_it():
    offenders = {m: sorted(t) for m, t in graph().items() if "jointrag.cli" in t and m not in ("jointrag.cli", "jointrag.__main__")}
    assert offenders == {}


def test_layers_import_only_downwards():
    upward = sorted(
        (module, target) for module, targets in graph().items() for target in targets
        if target != "jointrag" and (layer(target) > layer(module) or (group(module), group(target)) in SIDEWAYS)
    )
    assert upward == []


def test_the_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = 2
        path.pop()
        return None

    for module in sorted(edges):
        if module not in state:
            assert visit(module) is None


def string_constants(path: Path) -> list[tuple[int, str]]:
    """(line, value) of the string literals of a file, docstrings excluded."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_a_method_name_is_written_in_the_registry_alone():
    """Outside the registry no code spells a method's name or a family prefix ('invar-'); 'rag-token'
    is also the name of a decoder (`eval.decode`), a separate namespace, so it is not searched for."""
    from jointrag.config import CHOICES

    names = set(METHODS) - set(CHOICES["eval.decode"])
    prefixes = {name.split("-")[0] + "-" for name in names if "-" in name}
    found = [
        f"{path.relative_to(PACKAGE)}:{line}: {value!r}"
        for path in modules().values() if path != REGISTRY
        for line, value in string_constants(path)
        if value in names or value in prefixes
    ]
    assert found == []


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_entry_is_an_objective_or_a_pipeline(name):
    entry = METHODS[name]
    assert (entry.objective is None) == (entry.options is None) == (entry.pipeline is not None), name
    assert entry.system is not None and entry.help

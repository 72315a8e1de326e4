"""The project's import graph: imports only go downward, and the serving side never needs Lightning or torch.

Every import is read from the source (ast), including those inside functions: an import moved into a
function to dodge a circle is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "training", "serving", "predict", "benchmarks")
# what each part may not import, at any depth (models is shared: it sits under every other part)
FORBIDDEN = {
    "models": ("training", "serving", "predict", "benchmarks", "service", "lightning"),
    "serving": ("training", "predict", "benchmarks", "lightning", "torch", "torchvision"),
    "service": ("training", "predict", "benchmarks", "lightning", "torch", "torchvision"),
    "predict": ("training", "serving", "benchmarks", "service", "lightning"),
    "training": ("serving", "predict", "benchmarks", "service"),
}


def project_modules() -> dict[str, Path]:
    files = {"service": ROOT / "service.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_names(path: Path, module: str) -> set[str]:
    """Dotted names of everything `path` imports, at any depth; `from a import b` yields a.b (the module a.b
    where there is one, else resolved to a below)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
            names.add(base)
    return names


def graph() -> dict[str, set[str]]:
    """project module -> the project modules it imports."""
    modules = project_modules()
    edges = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(path, module):
            while name and name not in modules:  # a.b.function -> a.b -> a
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        edges[module] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles() -> None:
    assert cycles(graph()) == []


def test_cycle_finder_finds_a_circle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_imports_go_downward(part: str) -> None:
    modules = project_modules()
    wrong = []
    for module, path in modules.items():
        if module.split(".")[0] != part:
            continue
        for name in imported_names(path, module):
            if name.split(".")[0] in FORBIDDEN[part]:
                wrong.append(f"{module} imports {name}")
    assert wrong == []

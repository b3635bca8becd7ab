"""The package's shape: imports point one way between its parts, and no module imports itself in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "megatron_moe"
# A part may import only parts of a lower rank (or itself).
RANKS = {
    "files": 0, "schema": 0, "config": 0, "directories": 0, "text": 0,
    "planner": 1,
    "platform": 2, "parallel": 2, "data": 2, "model": 3,
    "train": 4,
    "study": 5, "export": 5,
    "bench": 6,
    "cli": 7,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """megatron_moe modules imported, at run time or for type checking alike (a type a module needs is a dependency
    too)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "megatron_moe":  # from megatron_moe import directories
            found.update(f"megatron_moe.{a.name}" for a in node.names
                         if (PACKAGE / f"{a.name}.py").is_file() or (PACKAGE / a.name).is_dir())
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_moe"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("megatron_moe"))
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_part_has_a_rank():
    parts = {_part(m) for m in _graph()} - {None}
    assert parts == set(RANKS), "a new part of the package needs a rank here"


def test_imports_point_one_way():
    wrong = sorted(
        f"{mod} imports {dep}"
        for mod, deps in _graph().items()
        for dep in deps
        if _part(mod) and _part(dep) and RANKS[_part(dep)] > RANKS[_part(mod)]
    )
    assert not wrong, wrong


def test_no_import_circles():
    graph = _graph()
    modules = set(graph)
    edges = {m: {d for d in deps if d in modules and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    circles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                circles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])
    assert not circles, circles

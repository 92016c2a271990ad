"""The house stays in wings (DESIGN.md §2): the package parsed with `ast`, no import run.

Every import counts, at module level, inside functions and under `TYPE_CHECKING` alike:
no module imports itself back through any chain; no wing imports a wing above it; only
`engine/` imports mlx or mlx-lm; an import inside a function says why in a comment
(start-up time or deferring mlx are the reasons that hold).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mlxlite"

# Top to bottom; a wing may import its own modules and wings of a lower rank. Wings of one
# rank may import each other as long as the wings themselves form no cycle.
RANKS = {
    "__main__": 10,
    "cli": 9,
    "server": 8,
    "sched": 7,
    "dist": 6,
    "engine": 5,
    "constrain": 4, "modelfile": 4, "remote": 4,
    "store": 3,
    "formats": 2,
    "ground": 1,
}
GROUND = {"__init__", "config", "errors", "names", "options", "results", "progress"}
MLX_ROOTS = {"mlx", "mlx_lm"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def wing_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "ground"
    if (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return "__main__" if parts[1] == "__main__" else "ground"


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = importer.split(".")
    if not MODULES[importer].name == "__init__.py":
        package = package[:-1]
    package = package[: len(package) - node.level + 1]
    return ".".join(package + ([node.module] if node.module else []))


def imports_of(module: str) -> list[tuple[str, int, bool, bool]]:
    """(imported module, line, inside a function, has a comment there or on the line above)."""
    source = MODULES[module].read_text()
    lines = source.splitlines()
    found: list[tuple[str, int, bool, bool]] = []

    def commented(node: ast.stmt) -> bool:
        near = lines[node.lineno - 1 : node.end_lineno] + lines[max(0, node.lineno - 2) : node.lineno - 1]
        return any("#" in line for line in near)

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((alias.name, child.lineno, in_function, commented(child)))
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, child)
                for alias in child.names:
                    # `from pkg import mod` imports the module `pkg.mod` when there is one.
                    sub = f"{base}.{alias.name}"
                    target = sub if sub in MODULES else base
                    found.append((target, child.lineno, in_function, commented(child)))
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(ast.parse(source), False)
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, *_ in imports_of(module):
            if target in MODULES and target != module:
                edges[module].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                strong(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            strong(node)
    return found


def test_every_module_belongs_to_a_known_wing():
    unknown = sorted({wing_of(m) for m in MODULES} - set(RANKS))
    assert not unknown, f"wings missing from DESIGN.md §2's order: {unknown}"
    ground = sorted(m.split(".")[-1] for m in MODULES if wing_of(m) == "ground")
    stray = sorted(set(ground) - GROUND - {"mlxlite"})
    assert not stray, f"modules at the package root that belong in a wing: {stray}"


def test_no_import_cycles_between_modules():
    assert cycles(graph()) == []


def test_no_wing_imports_a_wing_above_it():
    upward = []
    wing_edges: dict[str, set[str]] = {w: set() for w in RANKS}
    for module, targets in graph().items():
        for target in targets:
            here, there = wing_of(module), wing_of(target)
            if here == there:
                continue
            wing_edges[here].add(there)
            if RANKS[there] > RANKS[here]:
                upward.append(f"{module} -> {target}")
    assert upward == []
    assert cycles(wing_edges) == [], "wings of one rank import each other both ways"


def test_only_the_engine_imports_mlx():
    outside = [f"{module}:{line} imports {target}"
               for module in MODULES if wing_of(module) != "engine"
               for target, line, *_ in imports_of(module) if target.split(".")[0] in MLX_ROOTS]
    assert outside == []


def test_imports_inside_functions_say_why():
    silent = [f"{module}:{line} {target}"
              for module in MODULES
              for target, line, in_function, commented in imports_of(module)
              if in_function and not commented and target.split(".")[0] == "mlxlite"]
    assert silent == [], "a lazy import needs a comment: start-up time, or deferring mlx"


@pytest.mark.parametrize("wing", sorted(w for w in RANKS if (PACKAGE / w).is_dir()))
def test_each_wing_opens_with_its_contract(wing):
    doc = ast.get_docstring(ast.parse((PACKAGE / wing / "__init__.py").read_text()))
    assert doc and "never" in doc.lower(), f"{wing}/__init__.py must say what it owns and never imports"


def test_the_checker_sees_a_cycle_an_upward_import_and_mlx():
    # The rules above are only as good as the graph: a planted cycle must show.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert wing_of("mlxlite.store.store") == "store" and wing_of("mlxlite.config") == "ground"
    edges = graph()
    assert "mlxlite.store" in edges["mlxlite.engine.model"]
    assert any(t.startswith("mlx") and t.split(".")[0] in MLX_ROOTS
               for t, *_ in imports_of("mlxlite.engine.model"))


def test_importing_every_module_outside_the_engine_loads_no_mlx():
    # The graph says who imports whom; this says what really loads (wing __init__s included).
    outside = sorted(m for m in MODULES if wing_of(m) != "engine" and m != "mlxlite.__main__")
    code = ("import importlib, sys\n"
            f"for name in {outside!r}: importlib.import_module(name)\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm'))\n"
            "assert not loaded, loaded\n"
            "import mlxlite.engine, mlxlite.engine.blas, mlxlite.engine.text\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')], 'engine wing'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=PACKAGE.parent)

"""The package tree is the architecture: imports only point down the layers, and nothing cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "mmemb"

# What each layer may import (besides itself). The foundation is items / fileio / hub / defaults / _version.
FOUNDATION = {"items", "fileio", "hub", "defaults", "_version"}
ALLOWED = {
    **{name: FOUNDATION for name in FOUNDATION},
    "data": FOUNDATION,
    "model": FOUNDATION,
    "index": FOUNDATION,
    "parallel": FOUNDATION,  # launching processes and sharing inference work between them (accelerate)
    "train": FOUNDATION | {"model", "data"},
    "method": FOUNDATION | {"model", "data", "train"},
    "eval": FOUNDATION | {"model", "data", "parallel"},
    "jobs": FOUNDATION | {"model", "index", "parallel"},
    "serve": FOUNDATION | {"model"},
    "pipeline": FOUNDATION | {"model", "data", "train", "method", "eval"},
    "cli": FOUNDATION | {"model", "data", "train", "method", "eval", "index", "jobs", "serve", "pipeline", "parallel"},
    "mmemb": FOUNDATION | {"model"},  # the package's own __init__: the public API
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Every mmemb module -> the mmemb modules it imports, at top level or inside functions."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mmemb"


def test_imports_point_down_the_layers():
    bad = [f"{m} imports {d}" for m, deps in import_graph().items() for d in deps
           if _layer(d) != _layer(m) and _layer(d) not in ALLOWED[_layer(m)]]
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = import_graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_package_says_what_it_owns():
    for init in PACKAGE.glob("*/__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{init} has no docstring"


def test_importing_the_model_core_loads_nothing_above_it():
    """`import mmemb.model` (and every module in it) pulls in no training, method, eval, serving or pipeline code."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import mmemb.model\n"
        "for m in pkgutil.iter_modules(mmemb.model.__path__):\n"
        "    importlib.import_module('mmemb.model.' + m.name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "mmemb.model.embedder" in out  # the check ran on the real package
    above = ("mmemb.train", "mmemb.method", "mmemb.eval", "mmemb.serve", "mmemb.pipeline", "mmemb.jobs", "mmemb.cli")
    loaded = [m for m in out if m.startswith(above)]
    assert not loaded, f"importing mmemb.model loaded {loaded}"

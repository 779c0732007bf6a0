"""The inputs layer's modules import each other without cycles, and no recipekit module
imports another module's private (``_name``) helpers.

Oracle: the package's source, parsed (module-level and function-level imports alike).
"""

from __future__ import annotations

import ast
from pathlib import Path

import recipekit

PACKAGE = Path(recipekit.__file__).resolve().parent


def imports(path: Path) -> list[ast.ImportFrom]:
    return [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("recipekit")]


def test_no_module_imports_a_private_name():
    found = [f"{p.relative_to(PACKAGE)}: {n.module}.{a.name}"
             for p in sorted(PACKAGE.rglob("*.py")) for n in imports(p) for a in n.names
             if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def test_the_inputs_modules_import_each_other_without_a_cycle():
    graph = {p.stem: {n.module.rsplit(".", 1)[1] for n in imports(p)
                      if n.module.startswith("recipekit.inputs.")}
             for p in (PACKAGE / "inputs").glob("*.py")}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())
    assert "adapters" not in graph["models"] and "models" not in graph["adapters"]

"""The test tree mirrors the package (tests/README.md): a test's place says what it tests.

Oracle: the file system. `tests/<pkg>/test_<mod>.py` must name a module `recipekit/<pkg>/<mod>.py`
(or a subpackage, or the package itself), optionally followed by `_<topic>`
(`test_coalesce_families.py` tests steps/coalesce.py across families); every folder is a
package (so same-named test files do not clash) that mirrors a package of recipekit or is one of
the few cross-cutting folders; test modules import helpers from `tests.helpers`, never from
conftest.py or from another test module.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "recipekit"

#: Folders that mirror no package: what each holds is in tests/README.md.
CROSS_CUTTING = {"e2e", "helpers", "goldens"}

#: Folders skipped altogether: generator scripts and the data they wrote (run standalone in
#: mergekit's venv, never imported by the suite).
DATA = {"goldens"}

#: Test files that name a topic rather than a module, and why.
TOPICS = {
    "test_layout.py": "the test tree itself",
    "test_no_code_execution.py": "a scan of every module's source",
    "test_file_access.py": "a scan of every module's source: only io/ and inputs/ open files",
    "inputs/test_layering.py": "imports between the inputs modules (no cycle, no private names)",
    "io/test_faults.py": "I/O errors across reader, writer and output state",
    "io/test_hostile.py": "hostile files across header, reader and the inputs layer",
    "merge/test_registry.py": "the method registry, wherever in merge/ it is defined",
    "steps/test_registry.py": "the op registry, wherever in steps/ it is defined",
    "steps/test_step_errors.py": "how every step module raises located errors",
}

#: Top-level names a test module must no longer import (they moved into tests.helpers).
OLD_HELPERS = {"conftest", "builders", "adapter_builders", "crashpoints", "recipe_strategies"}


def _folders() -> list[Path]:
    out = []
    for d in sorted(p for p in TESTS.rglob("*") if p.is_dir()):
        rel = d.relative_to(TESTS)
        if rel.parts[0] in DATA or "__pycache__" in rel.parts or rel.parts[0].startswith("."):
            continue
        out.append(d)
    return out


def _test_files() -> list[Path]:
    return [f for d in [TESTS, *_folders()] for f in sorted(d.glob("test_*.py"))]


def _names_a_module(package: Path, name: str) -> bool:
    """Whether ``name`` or one of its ``_``-prefixes names a module, a subpackage or the
    package itself."""
    parts = name.split("_")
    for i in range(len(parts), 0, -1):
        stem = "_".join(parts[:i])
        if (package / f"{stem}.py").is_file() or (package / stem / "__init__.py").is_file():
            return True
        if stem == package.name and package != PACKAGE:
            return True
    return False


def test_every_test_folder_is_a_package():
    missing = [str(d.relative_to(TESTS)) for d in [TESTS, *_folders()]
               if not (d / "__init__.py").is_file()]
    assert not missing, f"add an empty __init__.py to: {missing}"


def test_every_test_folder_mirrors_a_package():
    strays = []
    for d in _folders():
        rel = d.relative_to(TESTS)
        if rel.parts[0] in CROSS_CUTTING:
            continue
        if not (PACKAGE / rel / "__init__.py").is_file():
            strays.append(str(rel))
    assert not strays, (f"test folders with no package recipekit/<folder>/: {strays}; "
                        f"mirror a package, or use one of {sorted(CROSS_CUTTING)}")


def test_every_test_file_names_what_it_tests():
    strays = []
    for f in _test_files():
        rel = f.relative_to(TESTS)
        if rel.parts[0] in CROSS_CUTTING or rel.as_posix() in TOPICS:
            continue
        if not _names_a_module(PACKAGE.joinpath(*rel.parts[:-1]), f.stem[len("test_"):]):
            strays.append(rel.as_posix())
    assert not strays, (f"{strays}: name the module under recipekit/ a test file tests "
                        f"(test_<module>[_<topic>].py), or add it to TOPICS with a reason")


def _imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def _is_own_base(f: Path, mod: str) -> bool:
    """`tests/steps/test_coalesce_families.py` may reuse `tests.steps.test_coalesce`: a topic
    variant of a module's tests builds on them."""
    folder = ".".join(("tests", *f.relative_to(TESTS).parts[:-1]))
    base, _, name = mod.rpartition(".")
    return base == folder and f.stem.startswith(name + "_")


def test_helpers_come_from_the_helpers_package():
    bad = []
    for f in [*TESTS.glob("*.py"), *(p for d in _folders() for p in d.glob("*.py"))]:
        for mod in _imported_modules(f):
            top, last = mod.split(".")[0], mod.split(".")[-1]
            if top in OLD_HELPERS or top.startswith("test_") or (
                    top == "tests" and last.startswith("test_") and not _is_own_base(f, mod)):
                bad.append(f"{f.relative_to(TESTS)}: {mod}")
    assert not bad, (f"import helpers from tests.helpers.<module> (fixtures come from "
                     f"conftest.py by name, not by import): {bad}")


def test_helper_modules_stay_small():
    big = {f.name: n for f in (TESTS / "helpers").glob("*.py")
           if (n := len(f.read_text().splitlines())) > 500}
    assert not big, f"split these helpers by what they make (lines): {big}"

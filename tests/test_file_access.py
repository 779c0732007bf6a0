"""Files are opened in one layer: `recipekit/io/` (tensor files, outputs, state) and
`recipekit/inputs/` (everything a recipe names), and nowhere else but the exceptions below.

Oracle: the package's source, parsed. A call that opens, reads, writes, copies or deletes a file
(`open`, `Path.read_text`, `os.open`, `unlink`, `np.load`, `torch.load`, `safe_open`, ...)
outside those packages fails the test unless ALLOWED names the module and the call, with why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import recipekit

PACKAGE = Path(recipekit.__file__).resolve().parent
LAYERS = ("io/", "inputs/")
#: Module (or package prefix) -> the file calls it may make, and why.
ALLOWED: dict[str, tuple[set[str], str]] = {
    "recipe/": ({"read_text"}, "reads the recipe file it parses (with marks, for located "
                "errors) and the bundled schema"),
    "arch/": ({"read_text"}, "reads the bundled family JSON (package data)"),
    "tools/convert.py": ({"torch.load", "copyfile"}, "opens pickle checkpoints with torch.load "
                         "(weights only), the one place that does, and copies their other "
                         "files into the converted directory"),
    "steps/schema.py": ({"read_text"}, "the developer command that regenerates "
                        "schemas/recipe.schema.json reads the committed file"),
    "tools/verify.py": ({"from_pretrained"}, "`verify --load` loads the output with "
                        "transformers/PEFT to run a forward pass"),
}
#: Method names that touch files whatever object they are called on.
FILE_METHODS = {"read_text", "read_bytes", "write_text", "write_bytes", "unlink", "rmtree",
                "copyfile", "copy2", "copyfileobj", "fdopen", "mmap", "safe_open", "load_file",
                "save_file", "from_pretrained", "save_pretrained", "snapshot_download",
                "hf_hub_download"}
#: module.function calls that touch files.
MODULE_CALLS = {("os", "open"), ("os", "remove"), ("os", "unlink"), ("os", "replace"),
                ("os", "rename"), ("io", "open"), ("np", "load"), ("numpy", "load"),
                ("np", "save"), ("torch", "load"), ("torch", "save"), ("json", "load"),
                ("json", "dump"), ("shutil", "copy"), ("shutil", "move")}
BUILTINS = {"open", "safe_open", "load_file", "save_file"}


def file_calls(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in BUILTINS:
            out.append((node.lineno, f.id))
        elif isinstance(f, ast.Attribute):
            if isinstance(f.value, ast.Name) and (f.value.id, f.attr) in MODULE_CALLS:
                out.append((node.lineno, f"{f.value.id}.{f.attr}"))
            elif f.attr in FILE_METHODS or f.attr == "open":
                out.append((node.lineno, f.attr))
    return out


def allowed(rel: str, call: str) -> bool:
    if rel.startswith(LAYERS):
        return True
    return any(rel.startswith(prefix) and call in calls
               for prefix, (calls, _) in ALLOWED.items())


def test_only_io_and_inputs_open_files():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for line, call in file_calls(ast.parse(path.read_text(encoding="utf-8"))):
            if not allowed(rel, call):
                found.append(f"recipekit/{rel}:{line}: {call}")
    assert found == [], "open files through recipekit/io or recipekit/inputs:\n" + "\n".join(
        found)


def test_the_scan_sees_the_calls_it_looks_for():
    code = ("open(p)\np.read_text()\nos.open(p, 0)\np.unlink()\nnp.load(p)\n"
            "torch.load(p)\nsafe_open(p, 'pt')\njson.load(f)\nsh.copyfile(a, b)\n")
    assert [c for _, c in file_calls(ast.parse(code))] == [
        "open", "read_text", "os.open", "unlink", "np.load", "torch.load", "safe_open",
        "json.load", "copyfile"]

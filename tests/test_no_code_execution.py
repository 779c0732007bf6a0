"""No input can make recipekit execute code: a scan of the package's own source.

Oracle: the AST of every module under recipekit/ (docstrings and comments that mention these
names do not count). Allowed: `torch.load` in convert.py only, which is the explicit
`--allow-pickle` converter and passes ``weights_only=True``; `subprocess` in plan/dot.py only,
which runs Graphviz's `dot -Tsvg` (a fixed argument list, the DOT text on stdin, no shell) for
`plan --format svg`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from tests.helpers.recipes import ROOT

PACKAGE = ROOT / "recipekit"
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "execfile"}
FORBIDDEN_ATTRS = {("pickle", "load"), ("pickle", "loads"), ("marshal", "loads"),
                   ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
                   ("os", "system"), ("os", "popen"), ("dill", "load"),
                   ("yaml", "UnsafeLoader"), ("yaml", "FullLoader"), ("yaml", "Loader")}
FORBIDDEN_MODULES = {"pickle", "marshal", "shelve", "dill", "cloudpickle", "subprocess"}


def modules() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 20
    return files


def dotted(node: ast.AST) -> tuple[str, ...]:
    if isinstance(node, ast.Name):
        return (node.id,)
    if isinstance(node, ast.Attribute):
        return (*dotted(node.value), node.attr)
    return ()


def test_no_eval_exec_pickle_or_remote_code():
    problems = []
    torch_loads = []
    for path in modules():
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                    node.module or ""]
                problems += [f"{rel}:{node.lineno}: imports {n}" for n in names
                             if n.split(".")[0] in FORBIDDEN_MODULES
                             and (rel, n) != ("recipekit/plan/dot.py", "subprocess")]
            if isinstance(node, ast.Call):
                name = dotted(node.func)
                if name[-1:] and name[-1] in FORBIDDEN_CALLS and len(name) == 1:
                    problems.append(f"{rel}:{node.lineno}: calls {name[-1]}()")
                if tuple(name[-2:]) in FORBIDDEN_ATTRS:
                    problems.append(f"{rel}:{node.lineno}: calls {'.'.join(name)}")
                if tuple(name[-2:]) == ("torch", "load"):
                    torch_loads.append((rel, node))
                for kw in node.keywords:
                    if kw.arg == "trust_remote_code":
                        problems.append(f"{rel}:{node.lineno}: passes trust_remote_code")
            if isinstance(node, ast.Attribute) and (dotted(node.value)[-1:], node.attr) in {
                    (("yaml",), "UnsafeLoader"), (("yaml",), "FullLoader")}:
                problems.append(f"{rel}:{node.lineno}: uses yaml.{node.attr}")
    assert not problems, "\n".join(problems)
    assert [rel for rel, _ in torch_loads] == ["recipekit/tools/convert.py"] * len(torch_loads)
    assert torch_loads, "the converter is expected to use torch.load"
    for _, call in torch_loads:
        kw = {k.arg: k.value for k in call.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value


def test_the_scan_catches_what_it_looks_for(tmp_path, monkeypatch):
    bad = tmp_path / "recipekit"
    bad.mkdir()
    for i in range(20):
        (bad / f"m{i}.py").write_text("x = 1\n")
    (bad / "evil.py").write_text("import pickle\neval('1')\nf(trust_remote_code=True)\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", bad)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    try:
        test_no_eval_exec_pickle_or_remote_code()
    except AssertionError as e:
        text = str(e)
        assert "recipekit/evil.py:1: imports pickle" in text
        assert "recipekit/evil.py:2: calls eval()" in text
        assert "recipekit/evil.py:3: passes trust_remote_code" in text
    else:
        raise AssertionError("the scan missed planted problems")

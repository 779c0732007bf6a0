"""The README's two set-up commands, verbatim (safetensors' ReadmeTestCase habit).

`pip install -e .` itself is exercised by .ci/run on a clean clone; here the quickstart command
runs through the installed console script from a copy of the repository layout.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from tests.helpers.recipes import ROOT

QUICKSTART = "pip install -e .\nrecipekit run recipes/quickstart.yaml"
TESTS = 'pip install -e ".[test]" && pytest'


def test_readme_has_the_two_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S)
    assert QUICKSTART in [b.strip() for b in blocks]
    assert TESTS in [b.strip() for b in blocks]
    assert TESTS in (ROOT / ".ci" / "run").read_text()


def test_quickstart_runs_verbatim(tmp_path):
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    proc = subprocess.run(QUICKSTART.splitlines()[1].split(), cwd=tmp_path, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("wrote out/quickstart: 12 layers, 1 shard(s)")
    assert (tmp_path / "out" / "quickstart" / "model.safetensors").is_file()


def test_reliability_table_matches_the_suite():
    """README "Reliability": the table's counts are the suite's (issue 17). Oracle: the test ids
    `pytest --collect-only` lists, assigned to rows by tests/helpers/reliability.py; after
    adding hostile tests, paste `python -m tests.helpers.reliability` into README.md."""
    from tests.helpers.reliability import collected_ids, count, readme_table, table

    ids = collected_ids()
    assert len(ids) > 1000  # the whole suite was collected
    assert readme_table() == table(count(ids))


def _yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def _as_recipe(block: str) -> dict | None:
    """A README yaml block as a recipe document: a whole recipe as written; a fragment (steps,
    an `adapters:`/`steps:`/`output:` part, a parameter value) inside a skeleton that declares
    every name it uses as a model (or, where used as an adapter, an adapter). None for blocks
    that are not recipe text (the pre-commit config)."""
    import yaml

    from recipekit.recipe import step_references

    data = yaml.safe_load(block)
    if isinstance(data, dict) and "recipekit" in data:
        return data
    if isinstance(data, dict) and "repos" in data:
        return None
    if isinstance(data, dict) and set(data) == {"alpha"}:
        data = [{"name": "mixed", "op": "interpolate", "from": ["a", "b"], **data}]
    doc = {"recipekit": 1, **(data if isinstance(data, dict) else {"steps": data})}
    steps = doc.setdefault("steps", [])
    defined = {s["name"] for s in steps} | set(doc.get("adapters", {}))
    models, adapters = {}, dict(doc.get("adapters", {}))
    for step in steps:
        for ref, rel in step_references(step):
            if ref not in defined:
                (adapters if rel[0] == "adapters" else models)[ref] = f"./{ref}"
    doc["models"] = models
    if adapters:
        doc["adapters"] = adapters
    return doc


def test_every_readme_recipe_snippet_validates(cli, tmp_path, monkeypatch):
    """Every yaml block of the README that is recipe text passes `validate --no-inputs` (the
    models it names are not here), whole recipes as written and fragments in a skeleton.
    Oracle: recipekit's own document checks; the count catches a block that stops being
    found."""
    import yaml

    monkeypatch.chdir(tmp_path)
    checked = []
    for i, block in enumerate(_yaml_blocks()):
        doc = _as_recipe(block)
        if doc is None:
            continue
        path = tmp_path / f"snippet{i}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False) if "recipekit" not in block
                        else block)
        result = cli("validate", "--no-inputs", path.name)
        assert result.exit_code == 0, f"README yaml block {i}:\n{block}\n{result.stderr}"
        checked.append(i)
    assert len(checked) == 12 and sum("recipekit:" in b for b in _yaml_blocks()) == 2


def test_readme_names_every_shipped_recipe():
    """README is where users look for examples: each file in recipes/ is named there."""
    text = (ROOT / "README.md").read_text()
    shipped = sorted(p.name for p in (ROOT / "recipes").glob("*")
                     if p.suffix in (".yaml", ".json"))
    assert len(shipped) == 10
    assert [n for n in shipped if f"recipes/{n}" not in text] == []


def test_python_example_runs(tmp_path):
    """README "From Python": the notebook-style example, run as written from a fresh process
    in a copy of the repository's recipes (issue 20 item 1). Oracle: its own assertions and the
    files it says it wrote."""
    import os
    import sys

    text = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, re.S)
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("ValidationResult(recipe='<dict>', steps=1")
    assert lines[1].startswith("12 250616 ")
    assert lines[2].startswith(f"{tmp_path / 'out' / 'notebook'} [('model.safetensors', '")
    assert (tmp_path / "out" / "notebook" / "model.safetensors").is_file()

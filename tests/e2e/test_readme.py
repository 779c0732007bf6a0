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

"""run/device.py: `import_torch` holds a Ctrl-C back until torch is loaded.

Oracle: the interpreter itself. A subprocess that has loaded neither torch nor numpy gets a
SIGINT just as torch's import starts loading numpy; a plain ``import torch`` swallows it (the
run went on, or failed later on a half-imported numpy), `import_torch` raises it afterwards,
with numpy whole.
"""

from __future__ import annotations

import builtins
import subprocess
import sys

import pytest

from recipekit import __main__ as entry

SCRIPT = """
import os, signal, sys
from recipekit.run.device import import_torch
assert "numpy" not in sys.modules and "torch" not in sys.modules
class CtrlC:  # Ctrl-C as torch's import starts loading numpy
    def find_spec(self, name, path, target=None):
        if name == "numpy":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, CtrlC())
try:
    import_torch()
except KeyboardInterrupt:
    import numpy, torch
    print("raised after the import", hasattr(numpy, "matrix"), torch.ones(2).sum().item())
else:
    print("not raised")
"""


def test_ctrl_c_during_the_import_is_raised_after_it():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == "raised after the import True 2.0", result.stderr


def test_the_console_script_exits_130_on_ctrl_c_while_loading(monkeypatch, capsys):
    """`recipekit.__main__.main` imports the CLI when called: a Ctrl-C there is one line."""
    real = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "recipekit.cli":
            raise KeyboardInterrupt
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as info:
        entry.main()
    assert info.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"

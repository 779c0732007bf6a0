"""io/names.py: each file name of the checkpoint and output layouts is spelled once.

Oracles: transformers' and PEFT's own constants; the package's source, parsed: no module but
io/names.py may hold one of these names as a string constant (messages that mention a name
inside longer text are fine).
"""

from __future__ import annotations

import ast
from pathlib import Path

import recipekit
from recipekit.io import names

PACKAGE = Path(recipekit.__file__).resolve().parent
SPELLED = {value: key for key, value in vars(names).items()
           if key.isupper() and isinstance(value, str)}


def test_every_layout_name_is_spelled_only_in_names_py():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == Path(names.__file__).resolve():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in SPELLED:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value!r} "
                             f"(use names.{SPELLED[node.value]})")
    assert found == []


def test_the_names_are_the_ones_transformers_and_peft_look_for():
    import peft.utils
    import transformers.utils

    t = transformers.utils
    assert (names.CONFIG, names.WEIGHTS, names.INDEX) == (
        t.CONFIG_NAME, t.SAFE_WEIGHTS_NAME, t.SAFE_WEIGHTS_INDEX_NAME)
    assert (names.ADAPTER_CONFIG, names.ADAPTER_WEIGHTS) == (
        peft.utils.CONFIG_NAME, peft.utils.SAFETENSORS_WEIGHTS_NAME)

"""The `layers` op's selection grammar end to end.

Oracle: Python's ``range`` on the input's layer indices, compared bit for bit (data only moves).
"""

from __future__ import annotations

import re

import torch

from tests.helpers.builders import read_tensors
from tests.helpers.recipes import solar_recipe, write_recipe

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def test_a_negative_step_reverses_the_stack_down_to_layer_zero(cli, tmp_path, tiny_llama):
    """``"range(7,-1,-1)"`` selects layers 7..0, as Python and fusion_bench do (issue 16.9)."""
    recipe = write_recipe(tmp_path, solar_recipe(tiny_llama, layers='["range(7,-1,-1)"]'))
    result = cli("run", recipe, "-q")
    assert result.exit_code == 0, result.output
    src, out = read_tensors(tiny_llama), read_tensors(tmp_path / "out")
    assert set(out) == set(src)
    for name, tensor in out.items():
        m = LAYER.match(name)
        source = f"model.layers.{7 - int(m[1])}.{m[2]}" if m else name
        assert torch.equal(tensor, src[source]), name
    assert any(not torch.equal(out[n], src[n]) for n in out if LAYER.match(n))

"""recipekit/merge/schema.py: the merge parts of the recipe schema, generated from `METHODS`.

Oracle: `METHODS` itself (mergekit 0.1.5's declarations, tests/goldens/merge/methods.json).
"""

from __future__ import annotations

from recipekit.merge import METHODS
from recipekit.merge.schema import method_table, parameter_properties


def test_a_default_every_method_shares_is_shown():
    assert parameter_properties(per_input=False)["density"]["default"] == 1.0
    assert parameter_properties(per_input=True)["density"]["default"] == 1.0


def test_a_name_with_several_defaults_shows_none():
    """`normalize` defaults to true for linear, ties, della and to false for the others (and
    `rescale` likewise): the `parameters` key showed the last method's default for all; now
    none, and each method's own is in `x-recipekit-methods`."""
    shared = parameter_properties(per_input=False)
    assert shared["normalize"] == {"type": "boolean"}
    assert shared["rescale"] == {"type": "boolean"}
    table = method_table()
    assert table["linear"]["parameters"]["normalize"]["default"] is True
    assert table["task_arithmetic"]["parameters"]["normalize"]["default"] is False
    assert list(table) == list(METHODS)

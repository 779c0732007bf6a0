"""Regenerate the registry-derived parts of `schemas/recipe.schema.json`.

Why: the schema is the recipe contract that editors complete from, so it lists the ops and the
merge methods; those lists belong to the registries (`recipekit.steps.OPS`,
`recipekit.merge.METHODS`). This module rewrites them in the committed file: the op enum, the
``if op == X then $defs/<Op.schema>`` dispatch (which is also how the loader finds an op's keys),
and the merge parts (`recipekit.merge.schema`). Everything else in the file is written by hand.

Usage, after adding an op or a merge method::

    python -m recipekit.steps.schema           # rewrite schemas/recipe.schema.json
    python -m recipekit.steps.schema --check   # exit 1 if the committed file is stale

tests/steps/test_registry.py runs the check.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from recipekit.io.writer import write_file_atomic
from recipekit.merge.schema import apply_merge_schema
from recipekit.steps import OPS

#: the committed schema, in the checkout (the wheel ships a copy as recipekit/_schemas/)
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "recipe.schema.json"


def op_dispatch() -> list[dict[str, Any]]:
    """The step definition's ``allOf``: one ``if op == name then $ref`` case per op."""
    return [{"if": {"properties": {"op": {"const": op.name}}, "required": ["op"]},
             "then": {"$ref": f"#/$defs/{op.schema}"}} for op in OPS.values()]


def generate_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` with its registry-derived parts rewritten from the registries.

    Raises:
        KeyError: an op's `schema` names no ``$defs`` entry.
    """
    out = copy.deepcopy(schema)
    defs = out["$defs"]
    missing = [op.name for op in OPS.values() if op.schema not in defs]
    if missing:
        raise KeyError(f"no $defs entry for op(s) {', '.join(missing)}")
    defs["step"]["properties"]["op"]["enum"] = list(OPS)
    defs["step"]["allOf"] = op_dispatch()
    apply_merge_schema(defs[OPS["merge"].schema], defs["merge_input"]["oneOf"][1])
    return out


def schema_text(schema: dict[str, Any]) -> str:
    """The file's text: two-space JSON, non-ASCII escaped, one final newline."""
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Rewrite the committed schema, or with ``--check`` report whether it is current."""
    parser = argparse.ArgumentParser(prog="python -m recipekit.steps.schema",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the file differs from what the registries give")
    parser.add_argument("path", nargs="?", type=Path, default=SCHEMA_PATH)
    args = parser.parse_args(argv)
    text = args.path.read_text()
    wanted = schema_text(generate_schema(json.loads(text)))
    if text == wanted:
        return 0
    if args.check:
        print(f"{args.path} is stale: run `python -m recipekit.steps.schema`", file=sys.stderr)
        return 1
    write_file_atomic(args.path, wanted.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

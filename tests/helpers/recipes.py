"""Recipes in tests: the repository root, the SOLAR-style recipe most tests start from, and
writing a recipe file (kept out of conftest.py so that test modules import them by name)."""

from __future__ import annotations

import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def solar_recipe(model: str | Path = "./model", layers: str = '["range(0,6)", "range(2,8)"]',
                 output: str | None = "  path: ./out") -> str:
    """The SOLAR-style recipe most tests start from (8 -> 12 layers of model `tiny`).

    ``output`` holds the lines under ``output:`` (None: no output section). Line numbers are
    stable: `layers` is on line 8, `output` on line 9.
    """
    text = (f"recipekit: 1\nmodels:\n  tiny: {model}\nsteps:\n  - name: up\n    op: layers\n"
            f"    from: tiny\n    layers: {layers}\n")
    return text if output is None else text + f"output:\n{output}\n"


def write_recipe(directory: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path

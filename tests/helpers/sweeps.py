"""The recipe the sweep tests run (two tiny Llamas interpolated, `alpha` and `dtype` as
variables; format with ``a=`` and ``b=`` model paths) and how they compare outputs."""

from __future__ import annotations

import hashlib
from pathlib import Path

SWEEP_RECIPE = """\
recipekit: 1
variables:
  alpha: 0.5
  dtype: float32
models:
  a: {a}
  b: {b}
steps:
  - name: blended
    op: interpolate
    from: [a, b]
    alpha: ${{alpha}}
output:
  path: out/grid
  dtype: ${{dtype}}
"""


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("*.safetensors"))}

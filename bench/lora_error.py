"""Reconstruction error of an extracted LoRA: ‖Δ − BA‖_F / ‖Δ‖_F summed over a model's weights.

    python bench/lora_error.py BASE_DIR TUNED_DIR ADAPTER_DIR

Why: `extract` compares tools that approximate Δ = tuned − base differently (recipekit's
randomized range finder, mergekit-extract-lora's full SVD of a bf16 difference), so their wall
times only compare at a stated error. Δ is taken in fp32 from the checkpoints, for every 2-D
``*.weight`` the tuned model changed; a weight with no module in the adapter counts with its
whole ‖Δ‖ (so skipping work is never rewarded), and Eckart–Young's optimum is what an exact
SVD of each Δ at the adapter's rank would leave. Modules stored (in, out) — embeddings'
``lora_embedding_A`` (r, V), ``lora_embedding_B`` (D, r) — are transposed back. Prints one
JSON object. Reads one tensor pair at a time (memory: a few fp32 copies of the largest).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors import safe_open

PREFIX = "base_model.model."


def open_tensors(directory: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file of ``directory`` that holds it."""
    where = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            where.update(dict.fromkeys(st.keys(), f))  # noqa: SIM118
    return where


def get(where: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(where[name], "pt") as st:
        return st.get_tensor(name)


def reconstruction_error(base: Path, tuned: Path, adapter: Path, *,
                         optimal: bool = False) -> dict[str, object]:
    """Summed squared errors and norms over the changed 2-D weights (see the module doc)."""
    b_at, t_at, a_at = open_tensors(base), open_tensors(tuned), open_tensors(adapter)
    err2 = norm2 = best2 = 0.0
    modules = changed = 0
    for name in sorted(t_at):
        if not name.endswith(".weight") or name not in b_at:
            continue
        t = get(t_at, name)
        if t.dim() != 2 or not t.is_floating_point():
            continue
        delta = t.float() - get(b_at, name).float()
        if not delta.any():
            continue
        changed += 1
        module = PREFIX + name[:-len(".weight")]
        keys = [(f"{module}.lora_A.weight", f"{module}.lora_B.weight", False),
                (f"{module}.lora_embedding_A", f"{module}.lora_embedding_B", True)]
        found = next(((a, b, tr) for a, b, tr in keys if a in a_at), None)
        n2 = float(delta.double().square().sum())
        norm2 += n2
        if found is None:
            err2 += n2
            continue
        a, b = get(a_at, found[0]).float(), get(a_at, found[1]).float()
        approx = b @ a
        err2 += float((delta - (approx.T if found[2] else approx)).double().square().sum())
        modules += 1
        if optimal:
            s = torch.linalg.svdvals(delta).double()
            best2 += float(s[a.shape[0]:].square().sum())
    out: dict[str, object] = {"relative_error": math.sqrt(err2 / norm2) if norm2 else 0.0,
                              "modules": modules, "changed_weights": changed}
    if optimal:
        out["optimal_relative_error"] = math.sqrt(best2 / norm2) if norm2 else 0.0
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("tuned", type=Path)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--optimal", action="store_true",
                        help="also the Eckart–Young optimum (a full SVD per weight: slow)")
    args = parser.parse_args(argv)
    print(json.dumps(reconstruction_error(args.base, args.tuned, args.adapter,
                                          optimal=args.optimal)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

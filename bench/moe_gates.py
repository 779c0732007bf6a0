"""Measure `hidden` MoE gates: recipekit's layer-by-layer forward against mergekit-moe 0.1.5.

``python bench/moe_gates.py BASE [--mode hidden] [--runs 2]`` computes the routers of two
experts (4 + 3 prompts, one negative) for the model directory BASE (it needs tokenizer.json,
e.g. the TinyLlama-shape fixture `bench/.fixtures/tinyllama-seed0`) both ways, each in a fresh
process measured as DESIGN.md §7 asks (bench/measure.py), and prints a markdown table: wall
time, peak RSS of the process, and for recipekit the peak above an idle process (VmHWM after
``clear_refs``) next to the plan's estimate for the sweep (`plan.cost.working_set`), and the
largest difference between the two tools' routers (mergekit computes in bf16, recipekit fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POSITIVE_A = ["def fibonacci(n):\n    return n if n < 2 else", "import numpy as np\nx = np.",
              "for i in range(10):\n    print(i)", "class Stack:\n    def push(self, x):"]
POSITIVE_B = ["Once upon a time, in a quiet village,", "The old sailor told a story about",
              "She opened the letter and began to read"]
NEGATIVE_B = ["SELECT name FROM users WHERE"]


def _kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+) kB", f.read()).group(1))  # type: ignore[union-attr]


def inner(base: Path, mode: str, out: Path) -> None:
    """In this process: recipekit's routers for ``base``, saved to ``out``; prints JSON."""
    import gc
    from dataclasses import replace
    from types import SimpleNamespace

    import torch

    from recipekit.inputs.resolve import resolve_sources
    from recipekit.inputs.tokenizer_file import KEY, resolve_tokenizer
    from recipekit.io.reader import FileReader
    from recipekit.plan.compile import model_from_checkpoint
    from recipekit.plan.cost import working_set
    from recipekit.recipe import Step, load_recipe
    from recipekit.run import execute
    from recipekit.steps.moe_gates import ExpertPrompts, prompt_gate_nodes

    with tempfile.TemporaryDirectory() as tmp:
        recipe_file = Path(tmp) / "recipe.yaml"
        recipe_file.write_text(f"recipekit: 1\nmodels:\n  base: {base}\nsteps:\n"
                               "  - name: gates\n    op: layers\n    from: base\n"
                               "    layers: [0]\n")
        recipe = load_recipe(recipe_file)
        sources = resolve_sources(recipe)
        step = Step("gates", "moe", {"base": "base"}, 0)
        step = replace(step, files={KEY: resolve_tokenizer(recipe, step, sources)})
        prompts = [ExpertPrompts(tuple(POSITIVE_A)),
                   ExpertPrompts(tuple(POSITIVE_B), tuple(NEGATIVE_B))]
        nodes = prompt_gate_nodes(step, recipe, model_from_checkpoint(sources["base"]),
                                  prompts, mode)
        estimate = max(working_set(n) for n in nodes)
        torch.ones(4).to(torch.bfloat16)
        execute._fixed_mmap_threshold()  # as `stream_shards` sets it for a run
        gc.collect()
        idle = _kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = time.perf_counter()
        with FileReader() as reader:
            rt = execute.Runtime(reader, torch.device("cpu"), None, None)  # type: ignore[arg-type]
            gates = torch.stack([execute.evaluate(n, SimpleNamespace(sources=sources), rt)
                                 for n in nodes])  # type: ignore[arg-type]
        wall = time.perf_counter() - start
        measured = (_kb("VmHWM") - idle) * 1024
    torch.save(gates, out)
    sweep = getattr(nodes[0], "gates", nodes[0])
    print(json.dumps({"measured": measured, "estimate": estimate, "sweep_s": wall,
                      "note": sweep.describe() if hasattr(sweep, "describe") else ""}))


def main() -> None:
    from bench.measure import run_measured

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("--mode", default="hidden")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    base = args.base.resolve()
    if args.inner:
        inner(base, args.mode, args.inner)
        return
    import torch

    mk_python = ROOT / "bench" / ".venv-mergekit" / "bin" / "python"
    with tempfile.TemporaryDirectory() as tmp:
        experts = Path(tmp) / "experts.json"
        experts.write_text(json.dumps([[POSITIVE_A, []], [POSITIVE_B, NEGATIVE_B]]))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        mk_env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
        mk_env.pop("PYTHONPATH", None)
        rows = []
        for run in range(args.runs):
            for tool in ("recipekit", "mergekit"):
                out = Path(tmp) / f"{tool}-{run}.pt"
                log = Path(tmp) / f"{tool}-{run}.log"
                if tool == "recipekit":
                    argv = [sys.executable, __file__, str(base), "--mode", args.mode,
                            "--inner", str(out)]
                    m = run_measured(argv, env=env, log=log)
                else:
                    argv = [str(mk_python), "-I",
                            str(ROOT / "tests" / "helpers" / "mergekit_moe_gates.py"),
                            str(base), str(experts), args.mode, str(out), "native"]
                    m = run_measured(argv, env=mk_env, log=log)
                if m.returncode != 0:
                    raise SystemExit(log.read_text()[-3000:])
                extra = json.loads(log.read_text().strip().splitlines()[-1]) \
                    if tool == "recipekit" else {}
                rows.append((tool, m, extra, out))
        ours = torch.load(rows[0][3])
        theirs = torch.load(rows[1][3])
        diff = float((ours - theirs).abs().max())
        # rows whose positives and negatives cancel are zero in both tools (no direction)
        live = (ours.norm(dim=-1) > 0.5) & (theirs.norm(dim=-1) > 0.5)
        cos = float(torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)[live].min())
        dead = (int((ours.norm(dim=-1) <= 0.5).sum()), int((theirs.norm(dim=-1) <= 0.5).sum()))
    print(f"| tool | wall s | peak RSS MiB | above idle MiB | estimate MiB |  ({base.name}, "
          f"{args.mode})\n|---|---|---|---|---|")
    for tool, m, extra, _ in rows:
        above = f"{extra['measured'] / 2**20:.0f}" if extra else ""
        est = f"{extra['estimate'] / 2**20:.0f}" if extra else ""
        print(f"| {tool} | {m.wall_s:.1f} | {m.peak_rss / 2**20:.0f} | {above} | {est} |")
    print(f"\nmax |recipekit - mergekit| = {diff:.2e}, min row cosine = {cos:.6f} "
          f"(zero rows: {dead[0]} recipekit, {dead[1]} mergekit)")
    if rows[0][2].get("note"):
        print(f"plan: {rows[0][2]['note']}")


if __name__ == "__main__":
    main()

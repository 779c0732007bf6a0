"""Peak memory of every computed method at Mistral-7B width, against `plan`'s estimate.

    python bench/peaks.py [--shape mistral-8l] [--methods ties,slerp,...]

Issue 18's target: "every computed case at Mistral-7B width: measured peak RSS <= 1 GiB and
within the plan's estimate". For each method this runs ``recipekit run RECIPE -q --no-fsync``
on the ``mistral-8l`` fixtures (hidden 4096, 32/8 heads, MLP 14336, 8 layers, 3.7 GiB bf16
each; seeds 0, 1, 2 as models a, b, c) and reports:

* **peak RSS**: the whole process's peak, measured as ``run.py`` does (``measure.py``: VmRSS
  sampled every 20 ms, and the kernel's VmHWM, which also catches a peak between samples; the
  larger of the two is reported). This is what the <= 1 GiB target is about.
* **idle**: the same command on the same recipe over a tiny fixture of the same family
  (2 layers, hidden 64): the interpreter, torch and recipekit imported, the plan made and
  every op run once on tiny tensors. `recipekit plan`'s estimate is the working set *above
  an idle process* (README, "peak memory"), so peak RSS − idle is what it must bound.
* **estimate**: ``estimates.peak_memory`` of ``recipekit plan RECIPE --json`` (on this
  machine, so with this machine's default ``piece_workers``).
* **wall**: of the whole run, start-up included; one run each, so noisy on a loaded machine.
  Memory is what this script is for; `run.py` is the place for times.

Inputs are read once before each run (warm page cache, as run.py). ``--no-fsync`` only
shortens the runs: fsync changes no allocation. Outputs go beside the fixtures and are deleted
after each run. The table goes to stdout and to ``bench/results/peaks-<stamp>.md`` (with the
raw numbers in ``.json``).

Oracle for the verdicts: the measurement, never the model; an estimate below a measurement is
a bug in ``recipekit/plan/cost.py`` (or a node's ``workspace``/``state_bytes``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fixtures  # noqa: E402 - bench/ is a folder of scripts, not a package
from measure import run_measured  # noqa: E402
from run import RESULTS, mib, recipekit_command, warm  # noqa: E402

#: The tiny fixture of the idle baseline: the same family and tensor names, negligible bytes.
TINY = fixtures.LlamaShape("tiny-idle", num_layers=2, hidden=64, heads=4, kv_heads=2,
                           intermediate=128, vocab=256)
TARGET = 1 << 30  # issue 18: measured peak RSS <= 1 GiB

_TA = "{model: b, weight: 0.5, density: 0.5}, {model: c, weight: 0.5, density: 0.5}"
#: method -> its step (below "  - name: out\n"), given the shape; models a, b, c, adapter lora.
STEPS: dict[str, str] = {
    "linear": "op: merge\n    method: linear\n    from: [{model: a, weight: 0.5}, "
              "{model: b, weight: 0.5}]",
    "interpolate": "op: interpolate\n    from: [a, b]\n    alpha: 0.3",
    "slerp": "op: merge\n    method: slerp\n    from: [a, b]\n    parameters: {t: 0.5}",
    "nuslerp": "op: merge\n    method: nuslerp\n    from: [{model: a, weight: 0.4}, "
               "{model: b, weight: 0.6}]",
    "multislerp": "op: merge\n    method: multislerp\n    from: [{model: a, weight: 0.3}, "
                  "{model: b, weight: 0.3}, {model: c, weight: 0.4}]",
    "karcher": "op: merge\n    method: karcher\n    from: [a, b, c]",
    "nearswap": "op: merge\n    method: nearswap\n    from: [a, b]\n    parameters: {t: 0.5}",
    "task_arithmetic": "op: merge\n    method: task_arithmetic\n    base: a\n"
                       "    from: [{model: b, weight: 0.5}, {model: c, weight: 0.5}]",
    "ties": f"op: merge\n    method: ties\n    base: a\n    from: [{_TA}]",
    "dare_linear": f"op: merge\n    method: dare_linear\n    base: a\n    from: [{_TA}]",
    "dare_ties": f"op: merge\n    method: dare_ties\n    base: a\n    from: [{_TA}]",
    "breadcrumbs": f"op: merge\n    method: breadcrumbs\n    base: a\n    from: [{_TA}]",
    "breadcrumbs_ties": f"op: merge\n    method: breadcrumbs_ties\n    base: a\n"
                        f"    from: [{_TA}]",
    "della": f"op: merge\n    method: della\n    base: a\n    from: [{_TA}]",
    "della_linear": f"op: merge\n    method: della_linear\n    base: a\n    from: [{_TA}]",
    "sce": "op: merge\n    method: sce\n    base: a\n    from: [b, c]\n"
           "    parameters: {select_topk: 0.5}",
    "model_stock": "op: merge\n    method: model_stock\n    base: a\n    from: [b, c]",
    "ram": "op: merge\n    method: ram\n    base: a\n    from: [b, c]",
    "ramplus_tl": "op: merge\n    method: ramplus_tl\n    base: a\n    from: [b, c]",
    "arcee_fusion": "op: merge\n    method: arcee_fusion\n    from: [a, b]",
    "extract_lora": "op: extract_lora\n    base: a\n    tuned: b\n    rank: 64",
    "lora_fold": "op: adapters\n    from: a\n    adapters: [lora]",
    "coalesce": "op: coalesce\n    from: a\n    width: WIDTH\n    depth: DEPTH",
}


@dataclass
class Row:
    method: str
    peak: int | None = None  # whole process, bytes
    idle: int | None = None  # the same recipe on the tiny fixture
    estimate: int | None = None
    wall_s: float | None = None
    error: str = ""

    @property
    def above_idle(self) -> int | None:
        return None if self.peak is None or self.idle is None else self.peak - self.idle

    def verdict(self) -> str:
        if self.error:
            return f"FAILED: {self.error}"
        if self.above_idle is None or self.estimate is None or self.peak is None:
            return "n/a"
        parts = ["≤ 1 GiB" if self.peak <= TARGET else "OVER 1 GiB",
                 "within estimate" if self.above_idle <= self.estimate else "ABOVE ESTIMATE"]
        return ", ".join(parts)


def used_models(method: str) -> list[str]:
    """The models (of a, b, c) that ``method``'s step names."""
    return [k for k in "abc" if re.search(rf"\b{k}\b", STEPS[method])]


def recipe_text(method: str, shape: fixtures.LlamaShape, models: dict[str, Path],
                lora: Path) -> str:
    """The recipe of ``method`` over the ``models`` it uses (a, b, c) and the adapter
    ``lora``; coalesce pairs head i with i + heads/2 and layer i with i + layers/2 (width
    only on a one-layer fixture: there is no pair of layers)."""
    half_heads, half_layers = shape.heads // 2, shape.num_layers // 2
    step = (STEPS[method]
            .replace("WIDTH", str([[i, i + half_heads] for i in range(half_heads)]))
            .replace("DEPTH", str([[i, i + half_layers] for i in range(half_layers)])))
    if not half_layers:
        step = step.replace("\n    depth: []", "")
    text = "recipekit: 1\nmodels:\n" + "".join(f"  {k}: {models[k]}\n"
                                               for k in used_models(method))
    if method == "lora_fold":
        text += f"adapters:\n  lora: {lora}\n"
    return text + f"steps:\n  - name: out\n    {step}\n"


def plan_estimate(recipe: Path) -> int:
    """``estimates.peak_memory`` of ``recipekit plan RECIPE --json``."""
    proc = subprocess.run([*recipekit_command(), "plan", str(recipe), "--json"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"plan failed: {proc.stderr.strip()[-500:]}")
    return int(json.loads(proc.stdout)["estimates"]["peak_memory"])


def measure_run(recipe: Path, out: Path, log: Path, inputs: list[Path]) -> tuple[int, float]:
    """(peak RSS of the whole process, wall seconds) of one ``recipekit run``."""
    shutil.rmtree(out, ignore_errors=True)
    warm(inputs)
    m = run_measured([*recipekit_command(), "run", str(recipe), "--output", str(out), "-q",
                      "--no-fsync"], log=log)
    shutil.rmtree(out, ignore_errors=True)
    if m.returncode != 0:
        raise RuntimeError(f"exit {m.returncode}: "
                           f"{log.read_text(errors='replace').strip()[-500:]}")
    # VmHWM is the single process's own high-water mark (also between two samples)
    return max(m.peak_rss, m.peak_hwm if m.max_processes == 1 else 0), m.wall_s


def model_dirs(shape: fixtures.LlamaShape) -> tuple[dict[str, Path], Path]:
    return ({k: fixtures.make_llama_checkpoint(shape, seed, log=False)
             for k, seed in (("a", 0), ("b", 1), ("c", 2))},
            fixtures.make_lora(shape, rank=8 if shape is TINY else 64))


def render(rows: list[Row], shape: str) -> str:
    lines = [f"| method ({shape}) | peak RSS | idle | above idle | plan estimate "
             "| estimate ÷ measured | wall s | verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = (f"{r.estimate / r.above_idle:.2f}" if r.estimate and r.above_idle
                 and r.above_idle > 0 else "n/a")
        wall = f"{r.wall_s:.1f}" if r.wall_s is not None else "n/a"
        lines.append(f"| {r.method} | {mib(r.peak)} | {mib(r.idle)} | {mib(r.above_idle)} "
                     f"| {mib(r.estimate)} | {ratio} | {wall} | {r.verdict()} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="mistral-8l", choices=sorted(fixtures.SHAPES),
                        help="fixture shape (default: mistral-8l, Mistral-7B width)")
    parser.add_argument("--layers", type=int, help="build the shape with this many layers "
                        "instead (e.g. 1: every tensor shape of the model in a quarter of the "
                        "bytes of mistral-8l; the peak is one tensor's, whatever the depth)")
    parser.add_argument("--methods", default=",".join(STEPS),
                        help=f"comma-separated, of: {', '.join(STEPS)} (default: all)")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in STEPS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    shape = fixtures.SHAPES[args.shape]
    if args.layers:
        name = f"{shape.name.split('-')[0]}-{args.layers}l"
        shape = dataclasses.replace(shape, name=name, num_layers=args.layers)
    fixtures.FIXTURES_DIR.mkdir(parents=True, exist_ok=True)
    tiny_models, tiny_lora = model_dirs(TINY)
    models, lora = model_dirs(shape)
    rows = []
    with tempfile.TemporaryDirectory(prefix="peaks-", dir=fixtures.FIXTURES_DIR) as tmp:
        work = Path(tmp)
        for method in methods:
            row = Row(method)
            rows.append(row)
            big = work / f"{method}.yaml"
            big.write_text(recipe_text(method, shape, models, lora))
            small = work / f"{method}-idle.yaml"
            small.write_text(recipe_text(method, TINY, tiny_models, tiny_lora))
            try:
                row.estimate = plan_estimate(big)
                row.idle, _ = measure_run(small, work / "out", work / f"{method}-idle.log", [])
                dirs = [models[k] for k in used_models(method)]
                dirs += [lora] if method == "lora_fold" else []
                inputs = sorted(p for d in dirs for p in d.iterdir() if p.is_file())
                row.peak, row.wall_s = measure_run(big, work / "out", work / f"{method}.log",
                                                   inputs)
            except RuntimeError as e:
                row.error = str(e).replace("\n", " ")[:300]
            print(render([row], shape.name).splitlines()[-1], file=sys.stderr, flush=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    table = render(rows, shape.name)
    header = (f"recipekit peaks {stamp}, {shape.name}: one run each, `run -q --no-fsync`, "
              "warm page cache; peak = max(sampled VmRSS, VmHWM) of the whole process; idle = "
              "the same recipe on a 2-layer hidden-64 fixture.\n\n")
    print(header + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"peaks-{stamp}.md").write_text(header + table)
    (RESULTS / f"peaks-{stamp}.json").write_text(json.dumps(
        {"shape": shape.name, "rows": [{**vars(r), "above_idle": r.above_idle} for r in rows]},
        indent=2) + "\n")
    bad = any(r.error or r.peak is None or r.peak > TARGET or r.above_idle is None
              or r.estimate is None or r.above_idle > r.estimate for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

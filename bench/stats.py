"""Time `recipekit inspect` and `recipekit diff` against the read floor of the same files.

Why: both commands read every value once; the target (issue 18 item 6) is at most 2x the time
of just reading the bytes. The *read floor* is a separate process (start-up counted, like every
tool's, DESIGN.md §7) that reads the same safetensors files front to back in 16 MiB
``readinto`` chunks. The *start-up* variant imports what every statistics run imports (the CLI
and numpy) and reads nothing, so the table also shows each command's time less its start-up,
against the floor: what the statistics themselves cost per byte.

Method: page cache warmed by one untimed read of every input; variants alternated, ``--runs``
rounds; the median is shown. ``--tree DIR`` runs the commands from another checkout (e.g. the
main branch, for before/after numbers), ``a``/``b`` pick other checkpoints or single
.safetensors files (a shard times an old, slow version in reasonable time).

Usage::

    python bench/stats.py [--runs N] [--tree DIR] [a [b]]
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures import make_tinyllama  # noqa: E402
from floor import read_floor  # noqa: E402
from measure import run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def weight_files(path: Path) -> list[str]:
    return [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="inspect/diff against the read floor")
    parser.add_argument("--runs", type=int, default=2, help="alternated rounds (default 2)")
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="the recipekit checkout to run (default: this one)")
    parser.add_argument("--read", nargs="+", help=argparse.SUPPRESS)  # the floor's process
    parser.add_argument("a", nargs="?", type=Path)
    parser.add_argument("b", nargs="?", type=Path)
    args = parser.parse_args(argv)
    if args.read:
        read_floor(args.read)
        return 0
    a = args.a or make_tinyllama(0)
    b = args.b or make_tinyllama(1)
    fa, fb = weight_files(a), weight_files(b)
    read_floor(fa + fb)  # warm the page cache
    compileall.compile_dir(args.tree.resolve() / "recipekit", quiet=1)  # run.compile_bytecode
    env = {**os.environ, "PYTHONPATH": str(args.tree.resolve())}
    py, me = sys.executable, str(Path(__file__).resolve())
    cli = [py, "-m", "recipekit.cli"]
    variants = {
        "read floor a": [py, me, "--read", *fa],
        "read floor a+b": [py, me, "--read", *fa, *fb],
        "start-up": [py, "-c", "import recipekit.cli, recipekit.tools.diff, numpy"],
        "inspect a": [*cli, "inspect", "--json", "-q", str(a)],
        "diff a b": [*cli, "diff", "--json", "-q", str(a), str(b)],
    }
    walls: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.runs):
        for label, cmd in variants.items():
            m = run_measured(cmd, env=env, cwd=ROOT)
            ok = m.returncode == 0 or (label.startswith("diff") and m.returncode == 1)
            if not ok:
                print(f"{label}: exit {m.returncode}", file=sys.stderr)
                return 1
            walls[label].append(m.wall_s)
            print(f"round {r + 1} {label}: {m.wall_s:.2f} s, peak RSS "
                  f"{m.peak_rss / 2**20:.0f} MiB", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in walls.items()}
    start = med["start-up"]
    print("| work | wall (s) | read floor (s) | x floor | less start-up, x floor |")
    print("|---|---|---|---|---|")
    for label, floor in (("inspect a", "read floor a"), ("diff a b", "read floor a+b")):
        f = med[floor]
        print(f"| {label} | {med[label]:.2f} | {f:.2f} | {med[label] / f:.2f} | "
              f"{(med[label] - start) / f:.2f} |")
    print(f"\nstart-up (import recipekit.cli, recipekit.tools.diff, numpy): {start:.2f} s; "
          f"tree {args.tree}; {len(os.sched_getaffinity(0))} usable cores; "
          f"median of {args.runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Recipe fuzzing soak: thousands of fuzzed recipes through the loader, compiler and CLI.

    python bench/fuzz_soak.py                      # 3000 cases, seed 0
    python bench/fuzz_soak.py --cases 20000 --seed 7 --run-every 5
    python bench/fuzz_soak.py --cases 0 --side 3000   # side commands and adapter configs only

The strategies and the oracle are tests/helpers/fuzz_*.py's (the same as
tests/e2e/test_fuzz_recipes.py, which runs ~500 cases in CI). Every case is loaded and, when it
loads, compiled against the tiny 8-layer Llama in recipes/models and checked against the
reference interpreter; every case also goes through `recipekit validate`, and a sample of those
that compile through `recipekit run`. ``--side N`` adds N cases of tests/helpers/fuzz_side.py:
`convert`, `lock`, `import-mergekit`, `diff`, `verify` and `inspect` on damaged inputs, and
folds of fuzzed adapter_config.json files (tests/e2e/test_fuzz_side_commands.py runs ~85 in
CI). Prints counts; saves each violating recipe and its report
under bench/results/fuzz-<time>/ (gitignored); exits 1 on any oracle violation.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub models in fuzzed recipes never go online
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the `tests` package, for its helpers

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.helpers.fuzz_mutations import recipe_files  # noqa: E402
from tests.helpers.fuzz_oracle import OracleViolation, check_case  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=3000, help="fuzzed recipes to check")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (reproducible)")
    ap.add_argument("--run-every", type=int, default=8,
                    help="run about one in N of the cases that compile through `recipekit run`")
    ap.add_argument("--no-cli", action="store_true", help="library levels only (faster)")
    ap.add_argument("--side", type=int, default=0,
                    help="also fuzz the side commands and adapter configs with this many cases")
    ap.add_argument("--limit", type=float, default=60.0, help="seconds before a case is a hang")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--max-memory-gib", type=float, default=6.0,
                    help="address-space limit, so a blow-up is a MemoryError (a violation) "
                    "rather than the OOM killer (0: none)")
    args = ap.parse_args()
    if args.max_memory_gib > 0:
        import resource

        limit = int(args.max_memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    from typer.testing import CliRunner

    from recipekit.cli import app

    model = (ROOT / "recipes" / "models" / "tiny-llama").resolve()
    abs_models = (str(model),)
    cli = None if args.no_cli else (CliRunner(), app)
    out_dir = args.results / time.strftime("fuzz-%Y%m%dT%H%M%SZ", time.gmtime())
    counts: collections.Counter[str] = collections.Counter()
    violations: list[str] = []
    start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="recipekit-fuzz-") as tmp:
        parent = Path(tmp)

        @seed(args.seed)
        @settings(max_examples=max(args.cases, 1), deadline=None, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def soak(data: st.DataObject) -> None:
            f = data.draw(recipe_files(abs_models), label="recipe")
            run = data.draw(st.integers(0, max(args.run_every - 1, 0)), label="run?") == 0
            n = counts["cases"]
            counts["cases"] += 1
            counts["origin " + f.origin.split("/")[0]] += 1
            try:
                o = check_case(f, parent, model, abs_models=abs_models, cli=cli, run=run,
                               limit=args.limit)
            except OracleViolation as e:
                _save(out_dir, n, f, f"oracle violation: {e}\n\n{traceback.format_exc()}")
                violations.append(f"case {n} ({f.origin}): {str(e).splitlines()[0][:200]}")
                return
            except MemoryError as e:  # the recipe made recipekit take all memory
                _save(out_dir, n, f, f"oracle violation: MemoryError\n\n{traceback.format_exc()}")
                violations.append(f"case {n} ({f.origin}): MemoryError {e!r}"[:240])
                return
            except Exception as e:  # the harness itself: report, do not stop the soak
                _save(out_dir, n, f, f"harness error: {e!r}\n\n{traceback.format_exc()}")
                violations.append(f"case {n} ({f.origin}): harness error {e!r}"[:240])
                return
            if not o.loaded:
                counts["load: RecipekitError"] += 1
            elif o.compiled:
                counts["compile: ok"] += 1
                counts["compile: ok, checked against the reference"] += o.good_sources
            else:
                counts["compile: RecipekitError"] += 1
            for line in o.cli:
                counts["cli " + line] += 1
            for k in set(o.known):  # once per case, whatever the stages it showed in
                counts["known open bug: " + k] += 1
            if counts["cases"] % 500 == 0:
                print(f"  {counts['cases']} cases, {len(violations)} violation(s), "
                      f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

        if args.cases > 0:
            soak()
        if args.side > 0:
            _soak_side(args, parent, counts, violations)

    secs = time.perf_counter() - start
    print(f"recipe fuzz soak: {counts['cases']} cases in {secs:.0f} s (seed {args.seed})")
    for key in sorted(counts):
        if key != "cases":
            print(f"  {key:48} {counts[key]:7d}")
    print(f"  {'oracle violations':48} {len(violations):7d}")
    for v in violations[:50]:
        print(f"    {v}")
    if violations:
        print(f"failing examples saved under {out_dir}")
        return 1
    return 0


def _soak_side(args: argparse.Namespace, parent: Path, counts: collections.Counter[str],
               violations: list[str]) -> None:
    """``--side``: side commands on damaged inputs, and adapter folds, alternately."""
    from typer.testing import CliRunner

    from recipekit.cli import app

    from tests.helpers.fuzz_side import (
        adapter_configs,
        check_adapter_fold,
        check_side,
        make_side_inputs,
        side_cases,
    )

    inputs = make_side_inputs(parent / "side-inputs",
                              (ROOT / "recipes" / "models" / "tiny-llama").resolve())
    runner = CliRunner()

    @seed(args.seed)
    @settings(max_examples=args.side, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def soak(data: st.DataObject) -> None:
        case = Path(tempfile.mkdtemp(dir=parent))
        n = counts["side cases"]
        counts["side cases"] += 1
        try:
            if data.draw(st.booleans(), label="adapter fold?"):
                config = data.draw(adapter_configs(inputs))
                what = f"fold: {check_adapter_fold(runner, app, inputs, case, config, args.limit)}"
            else:
                argv, writes = data.draw(side_cases(inputs, case))
                what = f"{argv[0]}: {check_side(runner, app, case, argv, writes, args.limit)}"
            counts["side " + what] += 1
        except (OracleViolation, MemoryError) as e:
            violations.append(f"side case {n}: {str(e).splitlines()[0][:200]}")
        except Exception as e:  # the harness itself: report, do not stop the soak
            violations.append(f"side case {n}: harness error {e!r}"[:240])
        finally:
            shutil.rmtree(case, ignore_errors=True)

    soak()


def _save(out_dir: Path, n: int, f, report: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"case{n:06d}-{f.origin.replace('/', '_')}"
    Path(f"{base}--{f.name}").write_bytes(f.data)
    Path(f"{base}.txt").write_text(report, errors="backslashreplace")


if __name__ == "__main__":
    sys.exit(main())

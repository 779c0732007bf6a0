"""The README's "Reliability" table, recomputed from the test suite, so that it stays true.

Each row is an attack class, the tests that attack it (selected by regular expressions over
collected pytest node ids: file, class and test names) and what they show. A test id counts in
the first row whose pattern it matches (rows are ordered most specific first); ids that match
no row are functional tests and are not counted. Pinned known-open bugs (``test_known_open_*``,
xfail) are not counted. New hostile tests land in a row by their class or test name (e.g. a
``TestSideCommands`` or ``TestResourceExhaustion`` class in tests/io/test_hostile.py).

    python -m tests.helpers.reliability        # prints the table (paste it into README.md)

tests/e2e/test_readme.py::test_reliability_table_matches_the_suite compares it with README.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterable

from tests.helpers.recipes import ROOT

HOSTILE = r"tests/io/test_hostile\.py::"

#: (attack class, id patterns, result). Order matters: the first matching row counts a test.
ROWS: list[tuple[str, tuple[str, ...], str]] = [
    ("Kills (SIGKILL at every I/O step, repeated, during `--force`, concurrent runs)",
     (r"tests/run/test_execute_crash\.py::",),
     "a rerun finishes byte-identical; no partial file under a final name"),
    ("Disk full, quota, `ulimit -f`, EIO, permission errors",
     (r"tests/io/test_faults\.py::",),
     "one clear message (exit 1), temp files removed, the same command resumes"),
    ("Resource exhaustion (sizes, FIFOs, devices, regexes, recursion depth)",
     (HOSTILE + r"Test\w*(Resource|Exhaust|Bound|Fifo|Regex|ReDoS|Recursion|Depth)",
      HOSTILE + r"(\w+::)?test_\w*(huge|fifo|over_the_limit|deep|recurs|redos|regex|dev_)",
      r"tests/e2e/test_fuzz_recipes\.py::test_(recursive_deep|huge_layer|range_numbers|long_)"),
     "refused before reading (size caps, regular files only), exit 2, no hang"),
    ("Outputs overlapping inputs, `--force`",
     (HOSTILE + r"Test\w*(Overlap|Force)",),
     "refused with exit 2 with or without `--force`; nothing deleted, inputs byte-identical"),
    ("Planted links under temp and output names",
     (HOSTILE + r"Test\w*(PlantedLink|LockWrites)",),
     "refused; nothing written through a link"),
    ("Side commands (`convert`, `lock`, `import-mergekit`, `diff`, `verify`, `inspect`)",
     (HOSTILE + r"Test\w*(Side|Convert|ImportMergekit|Lock|Verify|Diff|Inspect)",
      r"tests/tools/test_diff\.py::test_(unrelated|exit_status)"),
     "same confinement and exit codes as `run`; inputs untouched"),
    ("Non-finite numbers (NaN/Inf parameters, adapter scalings)",
     (HOSTILE + r"Test\w*(NonFinite|Nan)",
      r"^tests/(?!ops/|run/|tools/)[^:]*::(\w+::)?test_\w*(non_?finite|_nan|nan_|infinite)"),
     "refused, exit 2, located"),
    ("Hostile safetensors headers and tensor names",
     (HOSTILE + r"test_(refused_headers|deliberately|accepted_headers)",
      HOSTILE + r"Test(DamagedCheckpoint|HostileTensorNames)"),
     "refused naming file and tensor; agrees with the reference safetensors library"),
    ("Hostile indexes, configs and adapter configs",
     (HOSTILE + r"Test\w*(Index|Config|Adapter)",
      r"tests/inputs/test_models\.py::test_validate_and_inspect_agree"),
     "refused naming the file; `validate`, `inspect` and `run` agree"),
    ("Symlinks and special files in inputs",
     (HOSTILE + r"Test\w*(Symlink|Donor)",),
     "links out of a model refused (exit 2); unsafe donor files skipped with a warning"),
    ("Control characters and overlong values in output",
     (r"tests/test_errors\.py::", r"tests/tools/test_diff\.py::test_hostile"),
     "escaped (`\\x1b`, `\\n`, `\\u202e`) and shortened to 160 characters"),
    ("Malformed recipes (encodings, NUL, duplicate keys, user mistakes)",
     (r"tests/test_cli_errors\.py::", r"tests/recipe/test_document\.py::"),
     "one located message each (file:line:column), exit 2"),
    ("Fuzzing: recipes, side commands, adapter configs",
     (r"tests/e2e/test_fuzz_\w+\.py::",),
     "exit 0/1/2 only, no traceback; plans match a reference interpreter"),
    ("Code execution (pickles, `eval`, remote code)",
     (r"tests/test_no_code_execution\.py::", r"tests/tools/test_convert\.py::test_code_in"),
     "no code path runs input code"),
]

_KNOWN_OPEN = re.compile(r"::test_known_open")


def collected_ids() -> list[str]:
    """Every test id of the suite, as `pytest --collect-only -q` lists it."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "tests"], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    return [line for line in proc.stdout.splitlines() if "::" in line]


def count(ids: Iterable[str]) -> list[int]:
    """Tests per row (first matching row wins; known-open pins not counted)."""
    patterns = [[re.compile(p) for p in pats] for _, pats, _ in ROWS]
    counts = [0] * len(ROWS)
    for test_id in ids:
        if _KNOWN_OPEN.search(test_id):
            continue
        for i, pats in enumerate(patterns):
            if any(p.search(test_id) for p in pats):
                counts[i] += 1
                break
    return counts


def table(counts: list[int]) -> str:
    """The Markdown table README.md holds between its reliability-table markers."""
    lines = ["| Attack class | Tests | Result |", "|---|---:|---|"]
    lines += [f"| {name} | {n} | {result} |"
              for (name, _, result), n in zip(ROWS, counts, strict=True)]
    lines.append(f"| **Total** | **{sum(counts)}** | all pass |")
    return "\n".join(lines)


START, END = "<!-- reliability-table: start -->", "<!-- reliability-table: end -->"


def readme_table() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index(START) + len(START):text.index(END)].strip()


if __name__ == "__main__":
    print(table(count(collected_ids())))

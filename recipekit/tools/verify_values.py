"""`recipekit verify --stats`: read every value of an output and flag non-finite tensors.

Why: a hash check proves the bytes are the ones written, not that they are sound. A merge that
divided by a zero norm, or an fp16 output that overflowed, loads in transformers and produces
NaN logits later. ``--stats`` reads each floating tensor once through the same chunked,
multi-threaded statistics as `inspect` (`tools.stream_stats`: memory stays a few chunks per
worker, the work runs near the speed of reading the bytes) and reports every tensor holding NaN or
Inf as a failed check, naming the shard; the per-tensor statistics go to ``--json``.
Oracle: tests/tools/test_verify_values.py (planted NaN/Inf, whole-tensor torch statistics).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from recipekit.dtypes import is_floating
from recipekit.errors import VerifyError, display_path
from recipekit.io.header import read_header
from recipekit.io.reader import FileReader
from recipekit.tools.stream_stats import iter_tensor_stats


def check_values(out: Path, shards: list[str], *, workers: int | None = None
                 ) -> tuple[list[VerifyError], str, dict[str, dict[str, Any]]]:
    """Statistics of every floating tensor of ``shards`` (names inside ``out``).

    Returns the problems (one per shard with non-finite values, naming up to five tensors and
    their NaN/Inf counts), one summary line, and each tensor's statistics by name.
    """
    from recipekit.ops.stats import TensorStats  # torch: only when values are read

    started = time.perf_counter()
    problems: list[VerifyError] = []
    stats: dict[str, dict[str, Any]] = {}
    total = TensorStats()
    read = 0
    with FileReader() as reader:
        for shard in shards:
            path = out / shard
            infos = [i for i in read_header(path).values() if is_floating(i.dtype)]
            bad: list[str] = []
            for info, acc in zip(infos, iter_tensor_stats(reader, infos, workers=workers),
                                 strict=True):
                stats[info.name] = acc.summary()
                read += info.nbytes
                total.merge(acc)
                if acc.nan or acc.inf:
                    bad.append(f"{info.name} ({acc.nan} NaN, {acc.inf} Inf)")
            if bad:
                more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
                problems.append(VerifyError(
                    f"{len(bad)} tensor(s) hold non-finite values: {', '.join(bad[:5])}{more}",
                    file=display_path(path),
                    hint="the recipe produced them (a zero norm, an overflow in a narrow output "
                    "dtype) or an input holds them; `recipekit run --check-finite` names the "
                    "tensors of inputs and outputs that hold NaN or Inf"))
    seconds = time.perf_counter() - started
    finite = "all finite" if not problems else "NON-FINITE values found"
    line = (f"values: {len(stats)} floating tensors, {read / 2**30:.2f} GiB read in "
            f"{seconds:.1f} s, {finite}")
    if total.count:
        line += f"; mean {total.mean:.4g}, std {total.std:.4g}, max |x| " \
                f"{max(abs(total.min), abs(total.max)):.4g}"
    return problems, line, stats

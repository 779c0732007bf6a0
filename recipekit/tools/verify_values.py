"""`recipekit verify --stats`: read every value of an output and flag non-finite tensors.

Why: a hash check proves the bytes are the ones written, not that they are sound. A merge that
divided by a zero norm, or an fp16 output that overflowed, loads in transformers and produces
NaN logits later. ``--stats`` reads each floating tensor through the same chunked,
multi-threaded statistics as `inspect` (`tools.stream_stats`: memory stays a few chunks per
worker) and reports every tensor holding NaN or Inf as a failed check, naming the shard; the
per-tensor statistics go to ``--json``. Each shard is read once: `read_shards` hashes its bytes
and summarises its values in the same pass (`stream_stats.hash_and_summarise`), and `verify`
compares that hash with the manifest instead of reading the shard again.
Oracle: tests/tools/test_verify_values.py (planted NaN/Inf, whole-tensor torch statistics).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipekit.dtypes import is_floating
from recipekit.errors import RecipekitError, VerifyError, display_path
from recipekit.inputs.files import check_confined
from recipekit.io.header import read_header
from recipekit.io.reader import FileReader
from recipekit.tools.stream_stats import hash_and_summarise, iter_tensor_stats


@dataclass
class ShardValues:
    """What one read of a shard found: its sha256 and its floating tensors' statistics."""

    sha256: str
    stats: dict[str, Any]  # tensor name -> ops.stats.TensorStats, in header order


@dataclass
class ReadShards:
    """`read_shards`' result: the shards it read (by name) and the seconds it took."""

    shards: dict[str, ShardValues]
    seconds: float


def read_shards(out: Path, root: Path, shards: dict[str, dict[str, Any]], *,
                workers: int | None = None) -> ReadShards:
    """Hash and summarise, in one read each, the shards of ``out`` whose size matches the
    manifest's ``shards`` entry and whose header is sound; the others are left to `verify`'s
    own checks, which report them (a missing file, a link out of the output, a damaged header).

    Raises:
        TensorDataError: a shard cannot be read.
    """
    readable: list[tuple[str, Path, dict[str, Any]]] = []
    for name, entry in shards.items():
        path = out / name
        try:
            if not os.path.lexists(path):
                continue
            check_confined(path, root)
            if path.stat().st_size != entry["size"]:
                continue
            header = read_header(path)
        except (RecipekitError, OSError):
            continue
        readable.append((name, path, header))
    started = time.perf_counter()
    with FileReader() as reader:
        results = hash_and_summarise(reader, [(path, list(header.values()))
                                              for _, path, header in readable], workers=workers)
    found = {}
    for (name, _, header), (digest, stats) in zip(readable, results, strict=True):
        found[name] = ShardValues(digest, {t: stats[t] for t in header if t in stats})
    return ReadShards(found, time.perf_counter() - started)


def check_values(out: Path, shards: list[str], *, workers: int | None = None,
                 read: ReadShards | None = None
                 ) -> tuple[list[VerifyError], str, dict[str, dict[str, Any]]]:
    """Statistics of every floating tensor of ``shards`` (names inside ``out``): from ``read``
    where it holds the shard (`read_shards`), else read here.

    Returns the problems (one per shard with non-finite values, naming up to five tensors and
    their NaN/Inf counts), one summary line, and each tensor's statistics by name.
    """
    from recipekit.ops.stats import TensorStats  # numpy: only when values are read

    started = time.perf_counter()
    problems: list[VerifyError] = []
    stats: dict[str, dict[str, Any]] = {}
    total = TensorStats()
    nbytes = 0
    with FileReader() as reader:
        for shard in shards:
            path = out / shard
            infos = [i for i in read_header(path).values() if is_floating(i.dtype)]
            done = read.shards.get(shard) if read is not None else None
            accs = ([done.stats[i.name] for i in infos] if done is not None else
                    iter_tensor_stats(reader, infos, workers=workers))
            bad: list[str] = []
            for info, acc in zip(infos, accs, strict=True):
                stats[info.name] = acc.summary()
                nbytes += info.nbytes
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
    seconds = time.perf_counter() - started + (read.seconds if read is not None else 0.0)
    finite = "all finite" if not problems else "NON-FINITE values found"
    line = (f"values: {len(stats)} floating tensors, {nbytes / 2**30:.2f} GiB read in "
            f"{seconds:.1f} s" + (" (with the hashes)" if read is not None else "")
            + f", {finite}")
    if total.count:
        std = total.summary()["std"]
        line += f"; mean {total.average:.4g}, std {'-' if std is None else f'{std:.4g}'}, " \
                f"max |x| {max(abs(total.min), abs(total.max)):.4g}"
    return problems, line, stats

"""`recipekit diff A B`: how far two checkpoints are apart, tensor by tensor and layer by layer.

Tensors are aligned by name. For each pair of equal shape: max and mean |a − b|, the relative
norm difference ‖a − b‖ / ‖a‖ and the cosine similarity (`ops.stats.DiffStats`, fp64, read in
fixed-size chunks on every core by `tools.stream_stats`, so memory stays a few MiB per core).
Layer and model summaries are the same statistics of the concatenated values. Tensors only
in one side, or whose shapes differ, are listed.
Dtypes may differ (a bf16 output against its fp32 input): values are compared in fp64.
Two checkpoints without one same-named, same-shaped floating tensor are "nothing comparable":
``comparable`` is false and the summary's statistics are null, never the cosine 1 and relative
norm 0 of an empty sum. `verdict` gives the exit status scripts use, like diff(1).
Oracle: tests/tools/test_diff.py (a model against itself, a known perturbation, unrelated models).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from recipekit.dtypes import is_floating
from recipekit.errors import display_path, echo_text
from recipekit.inputs.checkpoints import OpenCheckpoint
from recipekit.io.header import TensorInfo
from recipekit.io.reader import FileReader
from recipekit.tools.inspect import OUTSIDE, LayerIndex, fmt_number, layer_sort_key, table
from recipekit.tools.stream_stats import iter_diff_stats


def diff_checkpoints(a: OpenCheckpoint, b: OpenCheckpoint, *,
                     progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The report `recipekit diff --json` prints.

    Raises:
        CorruptCheckpointError: a file is shorter than its header says.
    """
    from recipekit.ops.stats import DiffStats  # numpy, only when tensor values are read

    only_a = [n for n in a.tensors if n not in b.tensors]
    only_b = [n for n in b.tensors if n not in a.tensors]
    shape_mismatch = []
    rows: list[dict[str, Any]] = []
    layers: dict[str, DiffStats] = {}
    total = DiffStats()
    index = LayerIndex(a.tensors)
    pairs: list[tuple[TensorInfo, TensorInfo]] = []
    for name, ia in a.tensors.items():
        ib = b.tensors.get(name)
        if ib is None:
            continue
        if ia.shape != ib.shape:
            shape_mismatch.append({"name": name, "a": list(ia.shape), "b": list(ib.shape)})
            continue
        pairs.append((ia, ib))
    with FileReader() as reader:
        for (ia, ib), acc in zip(pairs, iter_diff_stats(reader, pairs), strict=True):
            name = ia.name
            if progress is not None:
                progress(ia.nbytes + ib.nbytes)
            rows.append({"name": name, "dtype_a": ia.dtype, "dtype_b": ib.dtype,
                         "shape": list(ia.shape), **acc.summary()})
            if is_floating(ia.dtype) or is_floating(ib.dtype):
                layers.setdefault(index.layer(name) or OUTSIDE, DiffStats()).merge(acc)
                total.merge(acc)
    differing = sum(1 for r in rows if not r["equal"])
    comparable = bool(rows)
    measured = total.count + total.nonfinite > 0  # an empty sum has cosine 1: print nothing
    return {
        "a": display_path(a.path),
        "b": display_path(b.path),
        "comparable": comparable,
        "compared": len(rows),
        "identical": len(rows) - differing,
        "differing": differing,
        "only_in_a": only_a,
        "only_in_b": only_b,
        "shape_mismatch": shape_mismatch,
        "summary": total.summary() if measured else dict.fromkeys(total.summary()),
        "layers": {k: layers[k].summary() for k in sorted(layers, key=layer_sort_key)},
        "tensor_list": rows,
    }


SAME, DIFFERENT = 0, 1


def verdict(report: dict[str, Any]) -> int:
    """The exit status of `recipekit diff`, like diff(1): 0 when every tensor has a same-shaped
    twin with equal values, 1 otherwise, including "nothing comparable" (2, trouble, comes from
    the error path)."""
    same = (report["comparable"] and not report["differing"] and not report["only_in_a"]
            and not report["only_in_b"] and not report["shape_mismatch"])
    return SAME if same else DIFFERENT


def _cosine(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def render_diff(report: dict[str, Any], *, verbose: bool = False) -> str:
    """A compact human summary: totals, one row per layer, and the tensors that differ most
    (every compared tensor with ``verbose``)."""
    s = report["summary"]
    lines = [f"a: {report['a']}", f"b: {report['b']}",
             f"{report['compared']} tensors compared: {report['identical']} identical, "
             f"{report['differing']} differ"]
    if not report["comparable"]:
        lines[-1] = "nothing comparable: no tensor has the same name and shape in both"
    for key, what in (("only_in_a", "only in a"), ("only_in_b", "only in b")):
        if report[key]:
            names = ", ".join(map(echo_text, report[key][:5])) + (
                ", ..." if len(report[key]) > 5 else "")
            lines.append(f"{len(report[key])} tensors {what}: {names}")
    for m in report["shape_mismatch"][:5]:
        lines.append(f"shape differs: {echo_text(m['name'])}: {m['a']} vs {m['b']}")
    if s["cosine"] is None:
        if s["nonfinite"]:
            lines.append(f"overall: no pair of finite values to compare ({s['nonfinite']} "
                         "non-finite pairs)")
        return "\n".join(lines)
    lines.append(f"overall: max |a-b| {fmt_number(s['max_abs'])}, mean |a-b| "
                 f"{fmt_number(s['mean_abs'])}, rel norm {fmt_number(s['rel_norm'])}, cosine "
                 f"{_cosine(s['cosine'])}" + (f", {s['nonfinite']} non-finite pairs skipped"
                                          if s["nonfinite"] else ""))
    head = ("", "max|a-b|", "mean|a-b|", "rel norm", "cosine")
    body = [(k, fmt_number(v["max_abs"]), fmt_number(v["mean_abs"]), fmt_number(v["rel_norm"]),
             _cosine(v["cosine"])) for k, v in report["layers"].items()]
    lines += ["", *table(("layer", *head[1:]), body)]
    rows = report["tensor_list"] if verbose else sorted(
        (r for r in report["tensor_list"] if not r["equal"]),
        key=lambda r: -(r["rel_norm"] if r["rel_norm"] is not None else float("inf")))[:10]
    if rows:
        title = "tensors" if verbose else "largest relative differences"
        lines += ["", f"{title}:", *table(("tensor", *head[1:]), [
            (echo_text(r["name"]), fmt_number(r["max_abs"]), fmt_number(r["mean_abs"]),
             fmt_number(r["rel_norm"]), _cosine(r["cosine"])) for r in rows])]
    return "\n".join(lines)

"""Per-layer charts, where a table is hard to read: `diff --chart` (the relative change of each
module, layer by layer) and `plan --chart` (each parameter's value across the layers, e.g. a
gradient `t: [0, 0.5, 1]`).

Why data and drawing are apart: `diff_series` and `parameter_series` compute the series from
the diff report and the plan (no matplotlib), and the `draw_*` functions take those series, so
tests check what is drawn (the series, and the lines and axes of the returned matplotlib
figure) rather than pixels. matplotlib is an optional extra (``pip install
'recipekit[charts]'``); only drawing imports it, through `Figure` (no pyplot: no global state,
no display needed). Oracle: tests/tools/test_charts.py.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from recipekit.errors import ExtraMissingError, OutputPathError, display_path
from recipekit.graph import Load, Node, expression_nodes
from recipekit.io.writer import write_file_atomic
from recipekit.tools.inspect import LayerIndex

#: A series: one value per layer (None where the layer has none).
Series = list[float | None]
#: File suffixes matplotlib writes without extra dependencies, by format name.
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
#: Lines beyond this many are summarised: a chart of 40 modules is unreadable.
MAX_LINES = 12


def require_matplotlib() -> None:
    """Fail before any work when `--chart` cannot be drawn.

    Raises:
        ExtraMissingError: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ExtraMissingError("--chart needs matplotlib, which is not installed",
                                hint="pip install 'recipekit[charts]'") from None


def check_chart_path(path: Path) -> str:
    """The format for ``path`` (by its suffix); refuse a folder or a non-regular file.

    Raises:
        OutputPathError: an unknown suffix, a directory, a device or FIFO.
    """
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputPathError(f"--chart {display_path(path)}: unknown image type "
                              f"{path.suffix or '(no suffix)'!r}",
                              hint="name a .png, .svg or .pdf file")
    if os.path.lexists(path) and not (path.is_symlink() or path.is_file()):
        raise OutputPathError(f"--chart {display_path(path)} exists and is not a file",
                              hint="name a new file")
    return fmt


def _layer_and_module(index: LayerIndex, name: str) -> tuple[int, str] | None:
    """``model.layers.3.mlp.up_proj.weight`` -> (3, ``mlp.up_proj``); None outside layers."""
    layer = index.layer(name)
    if layer is None:
        return None
    module = name[len(layer) + 1:]
    return int(layer.rpartition(".")[2]), module.removesuffix(".weight")


def diff_series(report: Mapping[str, Any]) -> dict[str, Series]:
    """Relative change ‖a − b‖ / ‖a‖ per layer: one series per module (``mlp.up_proj``,
    ``self_attn.q_proj.bias``, ...) from the report's tensors, and ``whole layer`` (first, so
    that a chart of more than `MAX_LINES` modules still draws it) from its layer summaries.
    Tensors outside the layer stacks have no layer and are left out."""
    rows = report["tensor_list"]
    index = LayerIndex([r["name"] for r in rows])
    found: dict[str, dict[int, float]] = {}  # "whole layer" first: `_draw` keeps the first lines
    whole = {}
    for key, stats in report["layers"].items():
        head, _, number = key.rpartition(".")
        if head and number.isdigit() and stats.get("rel_norm") is not None:
            whole[int(number)] = stats["rel_norm"]
    if whole:
        found["whole layer"] = whole
    for r in rows:
        where = _layer_and_module(index, r["name"])
        if where is not None and r["rel_norm"] is not None:
            found.setdefault(where[1], {})[where[0]] = r["rel_norm"]
    return _as_series(found)


def _as_series(found: Mapping[str, Mapping[int, float]]) -> dict[str, Series]:
    n = 1 + max((i for values in found.values() for i in values), default=-1)
    return {name: [values.get(i) for i in range(n)] for name, values in found.items()}


def _numbers(node: Node) -> Iterable[tuple[str, float]]:
    """(parameter, value) for each number an op node holds: a merge's parameters (one per
    operand: ``weight #1``, ``weight #2``), a lerp's or slerp's ``t``, a fold's weights."""
    from dataclasses import fields

    for f in fields(node):  # type: ignore[arg-type]
        value = getattr(node, f.name)
        if f.name == "params" and isinstance(value, tuple):
            for key, v in value:
                if isinstance(v, tuple) and len(v) > 1:
                    yield from ((f"{key} #{i + 1}", float(x)) for i, x in enumerate(v)
                                if isinstance(x, int | float) and not isinstance(x, bool))
                elif isinstance(v, tuple) and v and isinstance(v[0], int | float):
                    yield key, float(v[0])
                elif isinstance(v, int | float) and not isinstance(v, bool):
                    yield key, float(v)
        elif isinstance(value, float):
            yield f.name, value


def _op(node: Node) -> str:
    """A merge's method, else the node kind (a slerp's ``t`` lives in its coefficients)."""
    return getattr(node, "method", None) or type(node).__name__.lower().removesuffix(
        "coefficients")


def parameter_series(plan: Any) -> dict[str, Series]:
    """Each numeric parameter's value across the output's layers (e.g. ``slerp t``,
    ``ties density #2``), read off the plan's nodes, so a gradient or a rule list shows as the
    values the run uses. Where modules of a layer get different values (a rule matching
    ``*.mlp.*``), the parameter gets one series per group of modules that agree, named after
    the first of them; otherwise one series."""
    stack = getattr(plan.model, "stack", None)
    if plan.adapter or stack is None:
        return {}  # an adapter set has no layer stack of its own to plot along
    per: dict[str, dict[str, dict[int, float]]] = {}  # parameter -> module -> layer -> value
    index = LayerIndex([t.name for s in plan.shards for t in s.tensors])
    for s in plan.shards:
        for t in s.tensors:
            where = _layer_and_module(index, t.name)
            if where is None or not t.name.startswith(stack.prefix):
                continue
            for node in expression_nodes(t.node):
                if isinstance(node, Load):
                    continue
                for key, value in _numbers(node):
                    name = f"{_op(node)} {key}"
                    per.setdefault(name, {}).setdefault(where[1], {})[where[0]] = value
    found: dict[str, dict[int, float]] = {}
    for name, modules in per.items():
        groups: dict[tuple[tuple[int, float], ...], list[str]] = {}
        for module, values in modules.items():
            groups.setdefault(tuple(sorted(values.items())), []).append(module)
        for key, members in groups.items():
            label = name if len(groups) == 1 else f"{name} ({members[0]}" + (
                f" +{len(members) - 1} more)" if len(members) > 1 else ")")
            found[label] = dict(key)
    series = _as_series(found)
    n = stack.num_layers
    return {k: (v + [None] * n)[:n] for k, v in series.items()}


def _draw(series: Mapping[str, Series], path: Path, *, title: str, ylabel: str) -> Any:
    """One line per series (the first `MAX_LINES`), layers on x; written to ``path`` through
    the safe writer. Returns the matplotlib `Figure`."""
    fmt = check_chart_path(path)
    require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.add_subplot()
    shown = list(series.items())[:MAX_LINES]
    for name, values in shown:
        xs = [i for i, v in enumerate(values) if v is not None]
        ax.plot(xs, [values[i] for i in xs], marker="o", markersize=3, label=name)
    if len(series) > MAX_LINES:
        title += f" (first {MAX_LINES} of {len(series)} series)"
    ax.set_title(title)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if not shown:
        ax.text(0.5, 0.5, "nothing to draw", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=120, metadata={"Software": None} if fmt == "png" else None)
    write_file_atomic(path, buf.getvalue(), resumable=False)
    return fig


def draw_diff_chart(series: Mapping[str, Series], path: Path) -> Any:
    """`diff --chart`: relative change per layer, one line per module."""
    return _draw(series, path, title="relative change ‖a−b‖/‖a‖ per layer",
                 ylabel="relative change")


def draw_parameter_chart(series: Mapping[str, Series], path: Path) -> Any:
    """`plan --chart`: each parameter's value per layer."""
    return _draw(series, path, title="parameter values per layer", ylabel="value")

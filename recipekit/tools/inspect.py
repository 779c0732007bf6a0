"""`recipekit inspect`: what a checkpoint holds, from its headers and one pass over its data.

Names, shapes, dtypes and parameter counts (total, per layer, per module kind) come from the
headers alone; per-tensor mean/std/min/max/norm and NaN/Inf counts from one streaming pass
(`tools.stream_stats`: fp64, fixed-size chunks on every core, folded in order: memory stays a
few MiB per core whatever the tensor size). A PEFT
adapter directory also reports its LoRA rank(s), alpha, targets and trainable parameter count.

Parameter counts follow ``transformers``' ``num_parameters()``: floating tensors are parameters;
integer and bool tensors (BERT's ``position_ids``) are buffers, counted apart. Oracle:
tests/test_inspect.py (torch on the loaded tensors, PEFT's ``get_nb_trainable_parameters``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from recipekit.arch import scan_layer_stacks
from recipekit.dtypes import is_floating
from recipekit.errors import display_path, printable
from recipekit.inputs.checkpoints import OpenCheckpoint
from recipekit.io.header import TensorInfo
from recipekit.io.reader import FileReader
from recipekit.tools.stream_stats import iter_tensor_stats

OUTSIDE = "(outside layers)"
_LORA = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight|"
                   r"lora_embedding_(?P<eab>[AB])(?:\.[^.]+)?|lora_magnitude_vector(?:\.[^.]+)?)$")


class LayerIndex:
    """Which numbered layer a tensor belongs to, for any checkpoint (no architecture needed)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.prefixes = sorted(scan_layer_stacks(names), key=len, reverse=True)

    def layer(self, name: str) -> str | None:
        """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``."""
        for p in self.prefixes:
            if name.startswith(p):
                index, sep, _ = name[len(p):].partition(".")
                if sep and index.isdigit():
                    return p + index
        return None

    def kind(self, name: str) -> str:
        """The module a tensor belongs to, with its layer index starred:
        ``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.*.mlp.up_proj``."""
        module = name.rpartition(".")[0] or name
        for p in self.prefixes:
            if module.startswith(p):
                index, sep, rest = module[len(p):].partition(".")
                if index.isdigit():
                    return p + "*" + (sep + rest if sep else "")
        return module


def layer_sort_key(label: str) -> tuple:
    """Sort layer labels numerically (layer 10 after layer 9); the outside group first."""
    if label == OUTSIDE:
        return (0,)
    head, _, index = label.rpartition(".")
    return (1, head, int(index) if index.isdigit() else 0, index)


def inspect_checkpoint(ckpt: OpenCheckpoint, *, stats: bool = True,
                       progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The report `recipekit inspect --json` prints.

    Raises:
        CorruptCheckpointError: a file is shorter than its header says.
    """
    index = LayerIndex(ckpt.tensors)
    parameters = buffers = 0
    by_dtype: dict[str, int] = {}
    per_layer: dict[str, int] = {}
    per_kind: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    for name, info in ckpt.tensors.items():
        n = math.prod(info.shape)
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + n
        row: dict[str, Any] = {"name": name, "dtype": info.dtype, "shape": list(info.shape),
                               "elements": n, "file": info.file.name}
        rows.append(row)
        if not is_floating(info.dtype):
            buffers += n
            continue
        parameters += n
        layer = index.layer(name) or OUTSIDE
        per_layer[layer] = per_layer.get(layer, 0) + n
        kind = index.kind(name)
        per_kind[kind] = per_kind.get(kind, 0) + n
    report: dict[str, Any] = {
        "path": display_path(ckpt.path),
        "kind": ckpt.kind,
        "files": [f.name for f in ckpt.files],
        "tensors": len(rows),
        "parameters": parameters,
        "buffers": buffers,
        "dtypes": dict(sorted(by_dtype.items())),
        "layers": {p: len(s) for p, s in scan_layer_stacks(ckpt.tensors).items()},
        "per_layer": {k: per_layer[k] for k in sorted(per_layer, key=layer_sort_key)},
        "per_module": dict(sorted(per_kind.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
    if ckpt.hub is not None:
        report["hub"] = {"repo": ckpt.hub.repo, "commit": ckpt.hub.commit}
    if ckpt.kind == "model" and ckpt.config:
        report["architectures"] = _architectures(ckpt.config.get("architectures"))
        report["model_type"] = ckpt.config.get("model_type")
    if ckpt.kind == "adapter":
        report["adapter"] = describe_adapter(ckpt.config, ckpt.tensors)
    if stats:
        _add_stats(ckpt, rows, index, report, progress)
    report["tensor_list"] = rows
    return report


def _architectures(value: Any) -> list[str] | None:
    """config.json's ``architectures`` as class names: a bare string (hand-written configs have
    one) is one name, not a list of its letters; a non-string entry is shown as its JSON.
    Oracle: transformers reads ``architectures`` as a list of class names."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else [value]
    return [v if isinstance(v, str) else json.dumps(v) for v in items]


def _add_stats(ckpt: OpenCheckpoint, rows: list[dict[str, Any]], index: LayerIndex,
               report: dict[str, Any], progress: Callable[[int], None] | None) -> None:
    from recipekit.ops.stats import TensorStats  # numpy, only when tensor values are read

    layers: dict[str, TensorStats] = {}
    total = TensorStats()
    infos = [ckpt.tensors[row["name"]] for row in rows]
    with FileReader() as reader:
        for row, info, acc in zip(rows, infos, iter_tensor_stats(reader, infos), strict=True):
            row.update(acc.summary())
            if progress is not None:
                progress(info.nbytes)
            if is_floating(info.dtype):
                layers.setdefault(index.layer(info.name) or OUTSIDE, TensorStats()).merge(acc)
                total.merge(acc)
    report["layer_stats"] = {k: layers[k].summary() for k in sorted(layers, key=layer_sort_key)}
    report["stats"] = total.summary()
    report["nonfinite"] = {r["name"]: {"nan": r["nan"], "inf": r["inf"]} for r in rows
                           if r["nan"] or r["inf"]}


def describe_adapter(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> dict[str, Any]:
    """Rank, alpha, targets and trainable parameters of a PEFT LoRA adapter.

    The trainable count is every floating element the adapter file holds: LoRA factors, DoRA
    magnitudes, LoRA biases, `modules_to_save` copies and trainable tokens — what PEFT's
    ``get_nb_trainable_parameters()`` counts as trainable once the adapter is loaded — except
    the base-layer copies PEFT saves beside an embedding LoRA (``.base_layer.``), which are
    frozen base weights.
    """
    ranks: dict[str, int] = {}
    dora = set()
    other = 0
    trainable = 0
    for name, info in tensors.items():
        n = math.prod(info.shape)
        if is_floating(info.dtype) and ".base_layer." not in name:
            trainable += n
        m = _LORA.match(name)
        if m is None:
            other += n
            continue
        if "magnitude" in name:
            dora.add(m["module"])
        elif m["ab"] == "A" or m["eab"] == "A":
            ranks[m["module"]] = info.shape[0]
    by_rank: dict[int, int] = {}
    for r in ranks.values():
        by_rank[r] = by_rank.get(r, 0) + 1
    targets = sorted({m.rpartition(".")[2] for m in ranks})
    return {
        "peft_type": config.get("peft_type"),
        "base_model": config.get("base_model_name_or_path"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "use_rslora": bool(config.get("use_rslora")),
        "use_dora": bool(config.get("use_dora")),
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
        "target_modules": config.get("target_modules"),
        "modules_to_save": config.get("modules_to_save"),
        "targets": targets,
        "modules": len(ranks),
        "ranks": {str(k): v for k, v in sorted(by_rank.items())},
        "dora_modules": len(dora),
        "other_parameters": other,
        "trainable_parameters": trainable,
    }


def fmt_number(value: float | int | None) -> str:
    """A statistic for a table: 4 significant digits, '-' for undefined."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4g}"


def table(head: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> list[str]:
    """Rows of a plain-text table: the first column left-aligned, the others right-aligned."""
    rows = [tuple(printable(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    out = []
    for r in [head, *rows]:
        cells = [r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:],
                                                                     strict=True))]
        out.append("  ".join(cells).rstrip())
    return out


_STAT_HEAD = ("mean", "std", "min", "max", "norm", "nan", "inf")


def _stat_cells(s: dict[str, Any]) -> tuple[str, ...]:
    return tuple(fmt_number(s[k]) for k in _STAT_HEAD)


def render_inspect(report: dict[str, Any], *, verbose: bool = False) -> str:
    """A compact human summary: counts, parameters per module kind, one row per layer (and,
    with statistics, the tensors outside the layers and any with NaN/Inf; every tensor with
    ``verbose``)."""
    lines = [f"{report['path']}: {report['kind']}, {report['tensors']} tensors in "
             f"{len(report['files'])} file(s)"]
    if report.get("hub"):
        lines.append(f"hub: {report['hub']['repo']} @ {report['hub']['commit']}")
    if report.get("architectures") or report.get("model_type"):
        lines.append(f"architecture: {', '.join(report.get('architectures') or ['-'])} "
                     f"(model_type {report.get('model_type') or '-'})")
    dtypes = ", ".join(f"{k} {v:,}" for k, v in report["dtypes"].items())
    lines.append(f"parameters: {report['parameters']:,}"
                 + (f" (+ {report['buffers']:,} integer buffer values)" if report["buffers"]
                    else "") + f"; by dtype: {dtypes}")
    stacks = ", ".join(f"{p}* x {n}" for p, n in report["layers"].items())
    if stacks:
        lines.append(f"layers: {stacks}")
    if "adapter" in report:
        a = report["adapter"]
        ranks = ", ".join(f"r={k}: {v}" for k, v in a["ranks"].items())
        lines.append(f"adapter: {a['peft_type']}, r {a['r']}, lora_alpha {a['lora_alpha']}"
                     f"{', rsLoRA' if a['use_rslora'] else ''}{', DoRA' if a['use_dora'] else ''}"
                     f"; {a['modules']} modules ({ranks}) on {', '.join(a['targets']) or '-'}; "
                     f"trainable parameters {a['trainable_parameters']:,}"
                     + (f"; base {a['base_model']}" if a["base_model"] else ""))
    if "stats" in report:
        s = report["stats"]
        lines.append(f"values: mean {fmt_number(s['mean'])}, std {fmt_number(s['std'])}, "
                     f"min {fmt_number(s['min'])}, max {fmt_number(s['max'])}, "
                     f"NaN {s['nan']}, Inf {s['inf']}")
    lines += ["", *table(("module", "parameters"),
                         [(k, f"{v:,}") for k, v in report["per_module"].items()])]
    stats = report.get("layer_stats", {})
    head: tuple[str, ...] = ("layer", "parameters", *(_STAT_HEAD if stats else ()))
    lines += ["", *table(head, [(k, f"{v:,}", *(_stat_cells(stats[k]) if k in stats else ()))
                                for k, v in report["per_layer"].items()])]
    if stats:
        index = LayerIndex(r["name"] for r in report["tensor_list"])
        rows = [r for r in report["tensor_list"] if verbose or index.layer(r["name"]) is None
                or r["nan"] or r["inf"]]
        if rows:
            lines += ["", *table(("tensor", "dtype", "shape", *_STAT_HEAD), [
                (r["name"], r["dtype"], "x".join(map(str, r["shape"])) or "scalar",
                 *_stat_cells(r)) for r in rows])]
    elif verbose:
        lines += ["", *table(("tensor", "dtype", "shape"), [
            (r["name"], r["dtype"], "x".join(map(str, r["shape"])) or "scalar")
            for r in report["tensor_list"]])]
    return "\n".join(lines)

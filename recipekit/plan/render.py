"""Render a plan for people and tools: text (`recipekit plan`) and JSON (the DAG and the
schedule); the Graphviz pictures are `dot.py`'s.

Node ids are assigned in schedule order (shard by shard, tensor by tensor, inputs before the
node that uses them), so two renderings of the same plan are identical.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields, is_dataclass
from typing import Any

from recipekit.errors import display_path, echo_text, printable, terminal_text
from recipekit.graph import Load, Node, iter_post_order
from recipekit.plan import Plan
from recipekit.units import format_size

#: A label longer than this is cut: a chain of hundreds of steps, or one that uses a step twice
#: at every level, would otherwise print megabytes (or grow exponentially).
MAX_LABEL = 10_000


def node_label(node: Node) -> str:
    """``source:tensor`` for loads, ``op(inputs..., params)`` for computed nodes.

    Built inputs first with an explicit stack (no recursion: a 600-step chain is a 600-deep
    expression), each node once."""
    labels: dict[Node, str] = {}
    for n in iter_post_order(node, labels):
        if isinstance(n, Load):
            labels[n] = f"{n.source}:{printable(n.name)}"
            continue
        args = [labels[i] for i in n.inputs]
        args += [f"{k}={printable(v) if isinstance(v, str) else v}"
                 for k, v in _params(n).items() if k not in ("shape",)]
        text = f"{_op(n)}({', '.join(args)})"
        labels[n] = text if len(text) <= MAX_LABEL else text[:MAX_LABEL - 3] + "..."
    return labels[node]


def _op(node: Node) -> str:
    return type(node).__name__.lower()


def op_name(node: Node) -> str:
    """A merge's method name, otherwise the node kind."""
    return getattr(node, "method", None) or _op(node)


def _params(node: Node) -> dict[str, Any]:
    out = {}
    for f in fields(node):  # type: ignore[arg-type]
        value = getattr(node, f.name)
        if isinstance(value, Node) or (isinstance(value, tuple) and value
                                       and all(isinstance(v, Node) for v in value)):
            continue  # inputs (Merge operands, Coalesce members) are edges, not parameters
        if is_dataclass(value) and not isinstance(value, type):  # a forward's numbers
            value = asdict(value)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def number_nodes(plan: Plan) -> dict[Node, int]:
    """Ids in schedule order, inputs before the node that uses them (an explicit stack: chains
    may be hundreds of steps deep)."""
    ids: dict[Node, int] = {}
    for s in plan.shards:
        for t in s.tensors:
            for node in iter_post_order(t.node, ids):
                ids[node] = len(ids)
    return ids


def estimates(plan: Plan, disk_extra: int) -> dict[str, int]:
    return {
        "bytes_read": plan.bytes_read,
        "bytes_read_total": plan.bytes_read_total,
        "bytes_written": plan.bytes_written,
        "peak_memory": plan.peak_memory_estimate(),
        "disk": plan.bytes_written + disk_extra,
    }


def whole_tensor_estimate(plan: Plan) -> dict[str, Any] | None:
    whole = plan.largest_whole_tensor_op()
    if whole is None:
        return None
    name, node, size = whole
    return {"tensor": name, "op": op_name(node), "bytes": size}


def render_json(plan: Plan, *, disk_extra: int = 0) -> str:
    """The DAG (every distinct node once) and the schedule (shards, tensors, offsets)."""
    ids = number_nodes(plan)
    nodes = []
    for node, i in ids.items():
        entry: dict[str, Any] = {"id": i, "op": _op(node), **_params(node),
                                 "shape": list(node.shape), "dtype": node.dtype,
                                 "nbytes": node.nbytes}
        if node.inputs:
            entry["inputs"] = [ids[n] for n in node.inputs]
        nodes.append(entry)
    r = plan.recipe
    doc = {
        "recipe": str(r.document.file),
        "plan_hash": plan.plan_hash(),
        "output": {"path": r.output.url or str(r.output.path), "model": r.output.model,
                   "donor": plan.donor.name if plan.donor else None,
                   "num_layers": plan.model.stack.num_layers, "adapter": plan.adapter},
        "config": plan.config,
        "nodes": nodes,
        "shards": [{"filename": s.filename, "size": s.size, "header_bytes": len(s.header),
                    "tensors": [{"name": t.name, "node": ids[t.node], "offset": t.offset,
                                 "nbytes": t.nbytes} for t in s.tensors]}
                   for s in plan.shards],
        "estimates": {**estimates(plan, disk_extra), "whole_tensor": whole_tensor_estimate(plan)},
    }
    return json.dumps(doc, indent=2)


def sweep_notes(plan: Plan) -> list[str]:
    """What each sweep of the plan costs (a layer-by-layer forward: steps/moe_gates.py), once
    per sweep, in schedule order."""
    from recipekit.graph import expression_nodes
    from recipekit.graph.passes import Sweep

    seen: set[Node] = set()
    notes = []
    for s in plan.shards:
        for t in s.tensors:
            if isinstance(t.node, Load):
                continue
            for n in expression_nodes(t.node):
                if isinstance(n, Sweep) and n not in seen and hasattr(n, "describe"):
                    seen.add(n)
                    notes.append(echo_text(n.describe()))
    return notes


def render_text(plan: Plan, *, disk_extra: int = 0, verbose: bool = False) -> str:
    """The human summary `recipekit plan` prints; every input-derived string is escaped and
    shortened (`echo_text`), and `terminal_text` guards the whole."""
    r = plan.recipe
    est = estimates(plan, disk_extra)
    reread = (f" ({format_size(est['bytes_read_total'])} with re-reads)"
              if est["bytes_read_total"] != est["bytes_read"] else "")
    lines = [
        f"recipe:        {echo_text(r.document.file)}" + (f" ({echo_text(r.name)})" if r.name
                                                              else ""),
        f"output:        {r.output.url or display_path(r.output.path)}  " + (
            f"(adapter set '{echo_text(r.output.model)}': a PEFT adapter directory)"
            if plan.donor is None else f"(model '{echo_text(r.output.model)}', config from "
            f"'{echo_text(plan.donor.name)}')"),
        *([] if plan.adapter else [
            f"layers:        {plan.model.stack.num_layers}  (`{plan.model.stack.prefix}<i>`, "
            f"config key {'.'.join(plan.model.stack.count_key)})"]),
        *([f"chat template: {echo_text(plan.chat_template.source)}"]
          if plan.chat_template else []),
        f"tensors:       {plan.num_tensors} written, {len(plan.loads())} distinct inputs read",
        f"bytes read:    {format_size(est['bytes_read'])} distinct{reread}",
        f"bytes written: {format_size(est['bytes_written'])} in {len(plan.shards)} shard(s)",
        f"peak memory:   ~{format_size(est['peak_memory'])} working set above an idle process "
        "(estimate)",
        f"disk needed:   {format_size(est['disk'])}",
    ]
    whole = whole_tensor_estimate(plan)
    if whole is not None:
        lines.insert(-1, f"whole tensor:  {whole['op']} of `{printable(whole['tensor'])}` holds "
                     f"~{format_size(whole['bytes'])} at once (the largest op that reads a whole "
                     "tensor; elementwise ops run in chunks)")
    for text in sweep_notes(plan):
        lines.insert(-1, f"forward:       {text}")
    lines += ["", "shards:"]
    for s in plan.shards:
        lines.append(f"  {s.filename}  {len(s.tensors)} tensors, {format_size(s.size)}")
        if verbose:
            for t in s.tensors:
                lines.append(f"    {printable(t.name)}  {t.node.dtype}{list(t.node.shape)}  <- "
                             f"{node_label(t.node)}")
    return terminal_text("\n".join(lines))

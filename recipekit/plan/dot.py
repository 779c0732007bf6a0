"""Graphviz pictures of a recipe: the step graph (`plan --format dot`, the default), the tensor
graph (`--tensors`), and SVG through Graphviz's ``dot`` program (`--format svg`).

Why two graphs: the tensor graph has one node per tensor (hundreds of lines for a 12-layer
model), which answers "where does this tensor come from" but not "what does this recipe do".
The step graph has one node per input, per step and for the output, with edges labelled by
what flows along them (layer ranges, weights, densities) and each step's own parameters in its
label, in words rather than Python reprs. Inputs and steps the output does not depend on are
drawn dashed and marked "unused".

Every label is escaped for DOT (a backslash, a quote or a line break in a name or a tensor
name cannot end the string or start an escape), after `printable` made control characters
visible. Oracle: tests/plan/test_dot.py parses the output with pydot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

from recipekit.errors import ExtraMissingError, RenderError, printable
from recipekit.graph import Load, Node
from recipekit.plan.compile import Plan
from recipekit.plan.render import number_nodes, op_name
from recipekit.recipe import Recipe, parse_layer_range, step_references
from recipekit.units import format_size

#: A value's text is cut past this many characters (a long `labels:` list, a rule list).
MAX_VALUE = 60
#: Keys that name a step's kind rather than parameterise it.
_KIND_KEYS = ("name", "op", "method")


def quote(text: str) -> str:
    """A DOT double-quoted string holding ``text`` literally (one line)."""
    return '"' + printable(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def label(*lines: str) -> str:
    """A DOT label of several centred lines, each escaped."""
    return '"' + "\\n".join(quote(x)[1:-1] for x in lines if x) + '"'


def value_text(value: Any) -> str:
    """A parameter value as a person writes it: ``0.3``, ``gradient 0 → 0.5 → 1``,
    ``*.mlp.*: 0.3; else 0.5``, ``a, b, c``; long values cut with an ellipsis."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, dict) and set(value) == {"gradient"}:
        text = "gradient " + " → ".join(value_text(v) for v in value["gradient"])
    elif isinstance(value, list) and value and all(isinstance(v, dict) and "value" in v
                                                   for v in value):
        text = "; ".join(f"{v['match']}: {value_text(v['value'])}" if "match" in v
                         else f"else {value_text(v['value'])}" for v in value)
    elif isinstance(value, dict):
        text = ", ".join(f"{k} {value_text(v)}" for k, v in value.items())
    elif isinstance(value, list | tuple):
        text = ", ".join(value_text(v) for v in value)
    else:
        text = str(value)
    return text if len(text) <= MAX_VALUE else text[:MAX_VALUE - 1] + "…"


def layer_text(entry: Any) -> str:
    """One `layers` entry as layer numbers: ``"range(2,8)"`` → ``2–7``, ``[0, 4]`` → ``0–3``."""
    if isinstance(entry, str):
        try:
            r = parse_layer_range(entry)
        except ValueError:
            return entry
    elif isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, int) for v in entry):
        r = range(entry[0], entry[1])
    else:
        return value_text(entry)
    if len(r) == 1:
        return str(r[0])
    return f"{r[0]}–{r[-1]}" + (f" step {r.step}" if r.step != 1 else "")


def _edge_text(spec: dict[str, Any], path: tuple[Any, ...], op: str) -> str:
    """What flows along the edge of the reference at ``path`` (relative to the step)."""
    if len(path) == 1:
        if path[0] != "from":
            return str(path[0])  # base, ...
        if op == "layers":
            plain = [layer_text(e) for e in spec.get("layers", []) if not isinstance(e, dict)]
            return "layers " + ", ".join(plain) if plain else "other tensors"
        return ""
    parent: Any = spec
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, list):  # from: [a, b]: the order matters (slerp's t = 0 is a)
        return f"#{path[-1] + 1}" if len(parent) > 1 and path[0] == "from" else ""
    rest = {k: v for k, v in parent.items() if k != path[-1]}
    if "range" in rest:
        return "layers " + layer_text(rest["range"])
    if "layers" in rest and isinstance(rest["layers"], list):
        return "layers " + ", ".join(layer_text(e) for e in rest["layers"])
    return ", ".join(f"{k} {value_text(v)}" for k, v in rest.items())


def _step_lines(spec: dict[str, Any], refs: list[tuple[str, tuple[Any, ...]]]) -> list[str]:
    """The step's own parameters, one line each (references and layer lists are edges)."""
    edges = {path[0] for _, path in refs}
    if spec.get("op") == "layers":
        edges.add("layers")
    lines = []
    for key, value in spec.items():
        if key in _KIND_KEYS or key in edges:
            continue
        if key == "parameters" and isinstance(value, dict):
            lines += [f"{k}: {value_text(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {value_text(value)}")
    return lines


def _reaching(recipe: Recipe) -> set[str]:
    """Names (steps and inputs) the output model depends on."""
    seen, todo = set(), [recipe.output.model]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in recipe.steps:
            todo += [ref for ref, _ in step_references(recipe.steps[name].spec)]
    return seen


def _input_where(ref: Any) -> str:
    if ref.hub is not None:
        return f"{ref.hub}@{ref.revision}"
    return ref.written if isinstance(ref.written, str) else str(ref.path)


def render_step_dot(recipe: Recipe, *, donor: str | None = None,
                    summary: str | None = None) -> str:
    """The step graph: inputs (boxes; adapters as folders), steps (rounded boxes: name, op,
    parameters), the output (a double box: path, ``summary``); an edge per input a step uses,
    labelled with what it takes; a dashed edge from the ``donor`` of config.json to the
    output.

    Example:
        >>> from recipekit.recipe import load_recipe  # doctest: +SKIP
        >>> print(render_step_dot(load_recipe("recipes/quickstart.yaml")))  # doctest: +SKIP
    """
    used = _reaching(recipe)
    ids: dict[str, str] = {}
    lines = ["digraph recipe {", "  rankdir=LR;", "  labelloc=t;",
             f"  label={quote(recipe.name or recipe.file.name)};",
             "  node [fontname=Helvetica, fontsize=11];",
             "  edge [fontname=Helvetica, fontsize=9];"]

    def style(name: str, base: str = "") -> str:
        """Attributes of a node: gray and dashed when the output does not depend on it."""
        if name in used:
            return f", style={base}" if base else ""
        return f', style="{base + "," if base else ""}dashed", color=gray, fontcolor=gray'

    for kind, refs, shape in (("model", recipe.models, "box"),
                              ("adapter", recipe.adapters, "folder")):
        for name, ref in refs.items():
            ids[name] = f"in{len(ids)}"
            mark = "" if name in used else "(unused)"
            lines.append(f"  {ids[name]} [shape={shape}, label="
                         f"{label(name, f'{kind}: {_input_where(ref)}', mark)}{style(name)}];")
    for step in recipe.steps.values():
        spec = dict(step.spec)
        refs = list(step_references(spec))
        ids[step.name] = f"s{step.index}"
        op = step.op + (f" ({spec['method']})" if isinstance(spec.get("method"), str) else "")
        mark = "" if step.name in used else "(unused)"
        lines.append(f"  {ids[step.name]} [shape=box, label="
                     f"{label(step.name, op, *_step_lines(spec, refs), mark)}"
                     f"{style(step.name, 'rounded')}];")
        edges: dict[str, list[str]] = {}
        for ref, path in refs:
            if ref in ids:
                edges.setdefault(ref, []).append(_edge_text(spec, path, step.op))
        for ref, texts in edges.items():
            picks = [t.removeprefix("layers ") for t in texts if t.startswith("layers ")]
            rest = [t for t in texts if t and not t.startswith("layers ")]
            text = "; ".join(dict.fromkeys(
                [*(["layers " + ", ".join(picks)] if picks else []), *rest]))
            attrs = [f"label={label(text)}"] if text else []
            if step.name not in used:
                attrs.append("style=dashed, color=gray, fontcolor=gray")
            tail = f" [{', '.join(attrs)}]" if attrs else ""
            lines.append(f"  {ids[ref]} -> {ids[step.name]}{tail};")
    out = recipe.output
    where = os.path.relpath(out.path, recipe.file.parent)
    details = ", ".join(x for x in (out.dtype, f"shards ≤ {format_size(out.shard_size)}") if x)
    lines.append(f"  out [shape=box, peripheries=2, label="
                 f"{label('output', where, summary or '', details)}];")
    if out.model in ids:
        lines.append(f"  {ids[out.model]} -> out;")
    if donor is not None and donor in ids and donor != out.model:
        lines.append(f"  {ids[donor]} -> out [style=dashed, label={label('config, tokenizer')}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_plan_dot(plan: Plan) -> str:
    """`render_step_dot` for a compiled plan: the output's layer count and shards, and its
    donor."""
    what = ("PEFT adapter" if plan.adapter else f"{plan.model.stack.num_layers} layers")
    return render_step_dot(plan.recipe, donor=plan.donor.name if plan.donor else None,
                           summary=f"{what}, {plan.num_tensors} tensors, "
                           f"{len(plan.shards)} shard(s)")


def _params(node: Node) -> Iterator[tuple[str, Any]]:
    """A node's parameters (not its inputs, shape or dtype); a merge's pairs unpacked."""
    for f in fields(node):  # type: ignore[arg-type]
        value = getattr(node, f.name)
        if f.name == "segments":  # a row gather's map: how many runs, not each
            yield "runs", len(value)
            continue
        if f.name == "fill" and value is None:
            continue
        if f.name in ("shape", "dtype") or isinstance(value, Node) or (
                isinstance(value, tuple) and value and all(isinstance(v, Node) for v in value)):
            continue
        if f.name == "params" and isinstance(value, tuple):  # a merge's (name, value) pairs
            yield from ((k, v) for k, v in value)
            continue
        yield f.name, value


def render_tensor_dot(plan: Plan) -> str:
    """The tensor graph: loads as boxes (``source: tensor``), ops as ellipses (op, then its
    parameters as ``name value``), one cluster of written tensors per shard."""
    ids = number_nodes(plan)
    lines = ["digraph plan {", "  rankdir=LR;", "  node [fontname=monospace, fontsize=10];"]
    for node, i in ids.items():
        if isinstance(node, Load):
            lines.append(f"  n{i} [shape=box, label={label(f'{node.source}: {node.name}')}];")
        else:
            params = [f"{k} {value_text(list(v) if isinstance(v, tuple) else v)}"
                      for k, v in _params(node) if k != "method"]
            lines.append(f"  n{i} [shape=ellipse, label="
                         f"{label(op_name(node), *params, node.dtype)}];")
        lines += [f"  n{ids[inp]} -> n{i};" for inp in node.inputs]
    for k, s in enumerate(plan.shards):
        lines.append(f"  subgraph cluster_{k} {{")
        lines.append(f"    label={quote(s.filename)};")
        for j, t in enumerate(s.tensors):
            lines.append(f"    w{k}_{j} [shape=note, label={quote(t.name)}];")
        lines.append("  }")
        lines += [f"  n{ids[t.node]} -> w{k}_{j};" for j, t in enumerate(s.tensors)]
    lines.append("}")
    return "\n".join(lines) + "\n"


#: Seconds Graphviz may take to lay out a graph.
DOT_TIMEOUT = 120


def render_svg(dot: str) -> str:
    """The SVG Graphviz's ``dot`` program draws for ``dot``.

    Raises:
        ExtraMissingError: ``dot`` is not on PATH (with how to install it).
        RenderError: ``dot`` failed or timed out (its first line of stderr).
    """
    exe = shutil.which("dot")
    if exe is None:
        raise ExtraMissingError(
            "`--format svg` needs Graphviz's `dot` program, which is not on PATH",
            hint="install Graphviz (`apt install graphviz`, `brew install graphviz`, `conda "
            "install graphviz`), or write `--format dot` and render it elsewhere")
    try:
        done = subprocess.run([exe, "-Tsvg"], input=dot.encode(), capture_output=True,
                              timeout=DOT_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise RenderError(f"Graphviz `dot` took more than {DOT_TIMEOUT} s",
                             hint="use `--format dot` and render it yourself") from None
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()
        raise RenderError(f"Graphviz `dot` failed: {printable(why[0]) if why else '?'}",
                             hint="use `--format dot` and render it yourself")
    return done.stdout.decode()

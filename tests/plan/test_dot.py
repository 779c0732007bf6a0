"""dot.py: the step graph `plan --format dot` draws by default, the tensor graph on request,
and SVG through Graphviz.

Oracle: pydot, a DOT parser independent of ours, reads the output back (nodes, edges, labels,
styles); the recipe says what the picture must show; Graphviz itself renders the SVG when its
`dot` is on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from tests.helpers.adapter_builders import make_adapter
from tests.helpers.recipes import solar_recipe, write_recipe

pydot = pytest.importorskip("pydot")


def parse(text: str):
    """(nodes by id, edges as (src, dst) -> attributes, graph) as pydot reads them."""
    (graph,) = pydot.graph_from_dot_data(text)
    nodes = {n.get_name(): n for n in graph.get_nodes() if n.get_name() not in ("node", "edge")}
    edges = {(e.get_source(), e.get_destination()): e for e in graph.get_edges()}
    return nodes, edges, graph


def text_of(item) -> str:
    """A label as the picture shows it: quotes removed, DOT escapes undone."""
    raw = (item.get_label() or '""')[1:-1]
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), raw)


def plan_dot(cli, recipe, *args: str) -> str:
    result = cli("plan", recipe, "-f", "dot", *args)
    assert result.exit_code == 0, result.output
    return result.stdout


class TestStepGraph:
    def test_solar(self, cli, tmp_path, tiny_llama):
        """One input, one step, the output: 3 nodes, 3 edges (the donor's dashed), where the
        tensor graph has hundreds of lines."""
        r = write_recipe(tmp_path, solar_recipe(tiny_llama))
        text = plan_dot(cli, r)
        nodes, edges, graph = parse(text)
        assert sorted(nodes) == ["in0", "out", "s0"]
        assert text_of(nodes["in0"]) == f"tiny\nmodel: {tiny_llama}"
        assert text_of(nodes["s0"]) == "up\nlayers"
        assert text_of(nodes["out"]) == "output\nout\n12 layers, 111 tensors, 1 shard(s)\n" \
            "shards ≤ 4.66 GiB"
        assert set(edges) == {("in0", "s0"), ("s0", "out"), ("in0", "out")}
        assert text_of(edges[("in0", "s0")]) == "layers 0–5, 2–7"
        assert edges[("in0", "out")].get_style() == "dashed"
        assert graph.get_label() == '"recipe.yaml"'
        assert len(text.splitlines()) < 20 < len(plan_dot(cli, r, "--tensors").splitlines())

    def test_merge(self, cli, tmp_path, tiny_llama, tiny_llama_b):
        """Weights, densities (a gradient) and the base on the edges; method-wide parameters
        (a rule list) in the step; an input and a step the output does not use drawn dashed,
        gray and marked."""
        r = write_recipe(tmp_path, f"""
            recipekit: 1
            name: 'say "merge"'
            models: {{a: {tiny_llama}, b: {tiny_llama_b}, spare: {tiny_llama_b}}}
            steps:
              - name: tied
                op: merge
                method: ties
                base: a
                from: [{{model: b, weight: 0.5, density: {{gradient: [0.2, 0.8]}}}}]
                parameters: {{normalize: true}}
              - name: sl
                op: merge
                method: slerp
                from: [a, tied]
                parameters: {{t: [{{match: "*.mlp.*", value: 0.3}}, {{value: 0.5}}]}}
              - {{name: dead, op: interpolate, from: [a, spare], alpha: 0.5}}
            output: {{model: sl}}
            """)
        nodes, edges, graph = parse(plan_dot(cli, r))
        ids = {text_of(n).split("\n")[0]: k for k, n in nodes.items()}
        assert graph.get_label() == '"say \\"merge\\""'
        a, b, spare = ids["a"], ids["b"], ids["spare"]
        tied, sl, dead = ids["tied"], ids["sl"], ids["dead"]
        assert text_of(nodes[tied]) == "tied\nmerge (ties)\nnormalize: true"
        assert text_of(nodes[sl]) == "sl\nmerge (slerp)\nt: *.mlp.*: 0.3; else 0.5"
        assert text_of(edges[(b, tied)]) == "weight 0.5, density gradient 0.2 → 0.8"
        assert text_of(edges[(a, tied)]) == "base"
        assert (text_of(edges[(a, sl)]), text_of(edges[(tied, sl)])) == ("#1", "#2")
        assert edges[(tied, sl)].get_style() is None
        for unused in (spare, dead):
            assert text_of(nodes[unused]).endswith("\n(unused)")
            assert nodes[unused].get_color() == "gray"
        assert edges[(spare, dead)].get_style() == "dashed"
        assert (sl, "out") in edges and (dead, "out") not in edges
        assert len(edges) == 8  # b, a -> tied; a, tied -> sl; a, spare -> dead; sl, donor -> out

    def test_adapter_fold(self, cli, tmp_path, tiny_llama):
        make_adapter("llama", tiny_llama, tmp_path / "lora", r=2, target_modules=["q_proj"])
        r = write_recipe(tmp_path, f"""
            recipekit: 1
            models: {{tiny: {tiny_llama}}}
            adapters: {{style: ./lora}}
            steps:
              - {{name: folded, op: adapters, from: tiny, adapters: [{{use: style, weight: 0.8}}]}}
            """)
        nodes, edges, _ = parse(plan_dot(cli, r))
        assert nodes["in1"].get_shape() == "folder"
        assert text_of(nodes["in1"]) == "style\nadapter: ./lora"
        assert text_of(edges[("in1", "s0")]) == "weight 0.8"
        assert edges[("in0", "s0")].get_label() is None
        assert sorted(edges) == [("in0", "out"), ("in0", "s0"), ("in1", "s0"), ("s0", "out")]

    def test_hostile_text_stays_inside_its_label(self):
        """Quotes, backslashes, line breaks and control characters in names cannot end a
        label or start a DOT escape: pydot reads back exactly one node with the text."""
        from recipekit.errors import printable
        from recipekit.plan.dot import label

        evil = 'a"b\\n\\"c\nd\x1b[2J'
        (graph,) = pydot.graph_from_dot_data(f"digraph g {{ x [label={label(evil, 'two')}]; }}")
        (node,) = graph.get_nodes()
        assert text_of(node) == printable(evil) + "\ntwo"
        assert "\n" not in printable(evil) and "\x1b" not in printable(evil)


class TestSvg:
    def test_svg_with_graphviz(self, cli, tmp_path, tiny_llama):
        if shutil.which("dot") is None:
            pytest.skip("Graphviz `dot` is not on PATH")
        r = write_recipe(tmp_path, solar_recipe(tiny_llama))
        result = cli("plan", r, "-f", "svg")
        assert result.exit_code == 0, result.output
        assert "<svg" in result.stdout and "layers 0–5, 2–7" in result.stdout
        assert result.stdout.count('class="node"') == 3

    def test_svg_without_graphviz(self, cli, tmp_path, tiny_llama, monkeypatch):
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        r = write_recipe(tmp_path, solar_recipe(tiny_llama))
        result = cli("plan", r, "-f", "svg")
        assert result.exit_code == 2
        assert result.stderr == (
            "`--format svg` needs Graphviz's `dot` program, which is not on PATH; "
            "install Graphviz (`apt install graphviz`, `brew install graphviz`, `conda install "
            "graphviz`), or write `--format dot` and render it elsewhere\n")


def test_tensor_graph_labels_are_words(cli, tmp_path, tiny_llama):
    """`--tensors`: every plan node once, labels without Python reprs (no quotes, brackets of
    tuples or `key=value`)."""
    r = write_recipe(tmp_path, solar_recipe(tiny_llama, output="  dtype: bfloat16"))
    nodes, edges, _ = parse(plan_dot(cli, r, "--tensors"))
    plan = json.loads(cli("plan", r, "-f", "json").stdout)
    computed = [n for k, n in nodes.items() if k.startswith("n")]
    assert len(computed) == len(plan["nodes"])
    casts = [text_of(n) for n in computed if text_of(n).startswith("cast")]
    assert casts and set(casts) == {"cast\nBF16"}
    assert not any("'" in text_of(n) or "=" in text_of(n) for n in computed)
    assert os.linesep not in "".join(text_of(n).replace("\n", "") for n in computed)

"""render.py: `recipekit plan` as text and JSON (DAG + schedule); the tensor graph's DOT.

Oracle: the plan object itself (ids, offsets and sizes must agree with it) and JSON parsing.
"""

from __future__ import annotations

import json

from tests.helpers.recipes import solar_recipe, write_recipe


def test_json_is_the_dag_and_the_schedule(cli, tmp_path, tiny_llama):
    r = write_recipe(tmp_path, solar_recipe(tiny_llama, output="  shard_size: 100KB\n"
                                            "  dtype: bfloat16"))
    result = cli("plan", r, "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    nodes = {n["id"]: n for n in doc["nodes"]}
    assert list(nodes) == list(range(len(nodes)))
    loads = [n for n in nodes.values() if n["op"] == "load"]
    casts = [n for n in nodes.values() if n["op"] == "cast"]
    assert len(loads) == len(casts) == 3 + 8 * 9  # overlapping layers share their nodes
    assert all(nodes[c["inputs"][0]]["op"] == "load" and c["inputs"][0] < c["id"] for c in casts)
    assert {c["dtype"] for c in casts} == {"BF16"}
    written = [t for s in doc["shards"] for t in s["tensors"]]
    assert len(written) == 3 + 12 * 9
    for s in doc["shards"]:
        pos = 0
        for t in s["tensors"]:
            assert t["offset"] == pos and t["nbytes"] == nodes[t["node"]]["nbytes"]
            pos += t["nbytes"]
        assert s["size"] == s["header_bytes"] + pos
    est = doc["estimates"]
    assert est["bytes_written"] == sum(s["size"] for s in doc["shards"])
    assert est["bytes_read_total"] > est["bytes_read"]
    assert doc["config"]["num_hidden_layers"] == 12
    assert cli("plan", r, "--format", "json").stdout == result.stdout


def test_tensor_dot(cli, tmp_path, tiny_llama):
    r = write_recipe(tmp_path, solar_recipe(tiny_llama, output="  shard_size: 100KB"))
    result = cli("plan", r, "-f", "dot", "--tensors")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith("digraph plan {") and text.rstrip().endswith("}")
    shards = json.loads(cli("plan", r, "-f", "json").stdout)["shards"]
    assert len(shards) > 1
    assert text.count("subgraph cluster_") == len(shards)
    assert 'n0 [shape=box, label="tiny: lm_head.weight"];' in text


def test_text(cli, tmp_path, tiny_llama):
    r = write_recipe(tmp_path, solar_recipe(tiny_llama))
    lines = cli("plan", r, "-v").stdout.splitlines()
    assert lines[2] == "layers:        12  (`model.layers.<i>`, config key num_hidden_layers)"
    assert lines[3] == "tensors:       111 written, 75 distinct inputs read"
    assert "    model.layers.11.mlp.up_proj.weight  F32[64, 32]  <- " \
        "tiny:model.layers.7.mlp.up_proj.weight" in lines


def test_hostile_tensor_names_cannot_forge_lines():
    from recipekit.graph import load
    from recipekit.plan.dot import quote
    from recipekit.plan.render import node_label

    node = load("m", "evil\nwarning: forged\x00", (1,), "F32")
    assert node_label(node) == "m:evil\\nwarning: forged\\x00"
    assert "\n" not in quote(node.name)


def test_labels_escape_tensor_names_in_parameters():
    """A random merge names its tensor in a parameter; a hostile name must not reach the
    terminal raw (the same rule as for loads). Oracle: the escaped text."""
    from recipekit.graph import load
    from recipekit.plan.render import node_label
    from recipekit.steps.merge import Merge

    name = "evil\x1b[2J.weight"
    a, b = load("a", name, (2,), "F32"), load("b", name, (2,), "F32")
    label = node_label(Merge("dare_ties", (b,), a, (("weight", (1.0,)),), 0, name, "F32"))
    assert "\x1b" not in label
    assert label.count("evil\\x1b[2J.weight") == 3  # both loads and the tensor parameter

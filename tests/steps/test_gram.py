"""steps/gram.py: model_stock, karcher, multislerp and nuslerp streamed through a Gram pass.

Oracles: the whole-tensor kernels (`ops.merge.apply_method`) on the loaded tensors — within
1e-6 relative (max |error| / max |value| per tensor) of the kernel on fp64 copies, and of the
fp32 kernel wherever its own error is smaller, on the streamed path, forced by
`plan.cost.HOLD_BYTES = 0` with small pass pieces (`graph.passes.PASS_ELEMS`), and bit for
bit below `EXACT_BYTES` (the whole `Merge` stays) and for the row-local variants.
"""

from __future__ import annotations

import pytest
import torch

import recipekit.api
from recipekit.ops.merge import apply_method
from recipekit.steps.gram import GramStats, LinearCombine

from tests.helpers.builders import make_model, read_tensors, write_like
from tests.helpers.recipes import write_recipe


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("gram")
    base = make_model("llama", d / "base", layers=2, seed=0, dtype=torch.float32)
    tensors = read_tensors(base)
    out = {"base": base}
    # fine-tuned-like inputs: the base plus a shared offset plus each one's own (cos ≈ 0.5)
    shared = {k: 0.02 * torch.randn(v.shape, generator=torch.Generator().manual_seed(9))
              for k, v in tensors.items()}
    for i, name in enumerate(("x", "y", "z")):
        g = torch.Generator().manual_seed(10 + i)
        out[name] = write_like(base, d / name, {
            k: v + shared[k] + 0.02 * torch.randn(v.shape, generator=g)
            for k, v in tensors.items()})
    # degenerate inputs: a copy of the base (zero offset), the base negated (antipodal)
    out["same"] = write_like(base, d / "same", tensors)
    out["neg"] = write_like(base, d / "neg", {k: -v for k, v in tensors.items()})
    out["zero"] = write_like(base, d / "zero", {k: torch.zeros_like(v)
                                                 for k, v in tensors.items()})
    # the same checkpoint under a second name (a name twice in `from` is refused)
    out["x_again"], out["zero_again"] = out["x"], out["zero"]
    return out


def _recipe(models, step: str) -> str:
    lines = "".join(f"  {k}: {v}\n" for k, v in models.items())
    return (f"recipekit: 1\nmodels:\n{lines}steps:\n  - name: m\n    op: merge\n{step}"
            "output: {path: ./out}\n")


@pytest.fixture
def streamed(monkeypatch):
    """Every reduction streams from the files, in pieces of a few rows."""
    monkeypatch.setattr("recipekit.plan.cost.HOLD_BYTES", 0)
    monkeypatch.setattr("recipekit.plan.cost.EXACT_BYTES", 0)
    monkeypatch.setattr("recipekit.graph.passes.PASS_ELEMS", 1 << 10)


def _run(cli, tmp_path, models, step):
    r = write_recipe(tmp_path, _recipe(models, step))
    result = cli("run", r, "-q")
    assert result.exit_code == 0, result.output
    return read_tensors(tmp_path / "out"), recipekit.api.plan(r, warn=False)


def _node_types(plan) -> set[type]:
    return {type(t.node) for s in plan.plan.shards for t in s.tensors}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item() or 1.0
    return (got.double() - want.double()).abs().max().item() / scale


# (step, kernel of (tensors by model name) → tensor)
CASES = {
    "model_stock": ("    method: model_stock\n    base: base\n    from: [x, y, z]\n",
                    lambda t: apply_method("model_stock", [t["x"], t["y"], t["z"]],
                                           base=t["base"])),
    "model_stock_parallel": (
        "    method: model_stock\n    base: base\n    from: [x, x_again]\n",
        lambda t: apply_method("model_stock", [t["x"], t["x"]], base=t["base"])),
    "model_stock_zero_offset": (
        "    method: model_stock\n    base: base\n    from: [same, x]\n",
        lambda t: apply_method("model_stock", [t["same"], t["x"]], base=t["base"])),
    "karcher": ("    method: karcher\n    from: [x, y, z]\n",
                lambda t: apply_method("karcher", [t["x"], t["y"], t["z"]])),
    "karcher_one_iteration": (
        "    method: karcher\n    from: [x, neg, y]\n    parameters: {max_iter: 1}\n",
        lambda t: apply_method("karcher", [t["x"], t["neg"], t["y"]], params={"max_iter": 1})),
    "karcher_zero_input": (
        "    method: karcher\n    from: [zero, x]\n",
        lambda t: apply_method("karcher", [t["zero"], t["x"]])),
    "karcher_all_zero": (
        "    method: karcher\n    from: [zero, zero_again]\n",
        lambda t: apply_method("karcher", [t["zero"], t["zero"]])),
    "karcher_one": ("    method: karcher\n    from: [x]\n",
                    lambda t: apply_method("karcher", [t["x"]])),
    "multislerp": (
        "    method: multislerp\n    from: [{model: x, weight: 0.2}, {model: y, weight: 0.3},"
        " {model: z, weight: 0.5}]\n",
        lambda t: apply_method("multislerp", [t["x"], t["y"], t["z"]],
                               params={"weight": [0.2, 0.3, 0.5]})),
    "multislerp_base": (
        "    method: multislerp\n    base: base\n    from: [{model: x, weight: 1}, "
        "{model: y, weight: 2}]\n    parameters: {normalize_weights: false}\n",
        lambda t: apply_method("multislerp", [t["x"], t["y"]], base=t["base"],
                               params={"weight": [1, 2], "normalize_weights": False})),
    "multislerp_antipodal": (
        "    method: multislerp\n    from: [{model: x, weight: 1}, {model: x_neg, weight: 1}]\n",
        None),  # filled in below: x and −x
    "multislerp_one": (
        "    method: multislerp\n    base: base\n    from: [{model: x, weight: 1}]\n",
        lambda t: apply_method("multislerp", [t["x"]], base=t["base"], params={"weight": 1})),
    "nuslerp": (
        "    method: nuslerp\n    from: [{model: x, weight: 0.3}, {model: y, weight: 0.7}]\n",
        lambda t: apply_method("nuslerp", [t["x"], t["y"]], params={"weight": [0.3, 0.7]})),
    "nuslerp_base": (
        "    method: nuslerp\n    base: base\n    from: [{model: x, weight: 1}, "
        "{model: y, weight: -1}]\n",
        lambda t: apply_method("nuslerp", [t["x"], t["y"]], base=t["base"],
                               params={"weight": [1, -1]})),
    "nuslerp_collinear": (
        "    method: nuslerp\n    from: [{model: x, weight: 0.3}, {model: x_again, weight: 0.7}]\n",
        lambda t: apply_method("nuslerp", [t["x"], t["x"]], params={"weight": [0.3, 0.7]})),
    "nuslerp_zero": (
        "    method: nuslerp\n    base: base\n    from: [{model: same, weight: 0.5}, "
        "{model: x, weight: 0.5}]\n",
        lambda t: apply_method("nuslerp", [t["same"], t["x"]], base=t["base"],
                               params={"weight": [0.5, 0.5]})),
}


class TestStreamed:
    """Oracle: `apply_method` on the whole tensors, within 1e-6 relative, with every tensor
    streamed (HOLD_BYTES = 0) in pieces of about 1Ki values."""

    @pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1] is not None])
    def test_matches_whole_kernel(self, cli, tmp_path, models, streamed, case):
        step, kernel = CASES[case]
        out, plan = _run(cli, tmp_path, models, step)
        inputs = {k: read_tensors(v) for k, v in models.items()}
        if case.endswith("_one"):
            assert LinearCombine not in _node_types(plan)  # the single input, cast
        else:
            assert LinearCombine in _node_types(plan)
        assert plan.whole_tensor is None
        for name, t in out.items():
            want = kernel({k: v[name] for k, v in inputs.items()})
            exact = kernel({k: v[name].double() for k, v in inputs.items()})
            # within 1e-6 of the kernel, or — where the fp32 kernel's own error is larger
            # (nearly antipodal inputs) — closer to the fp64 kernel than it is
            assert _rel(t, exact) <= 1e-6, (case, name, _rel(t, exact))
            assert _rel(t, want) <= max(1e-6, 2 * _rel(want, exact)), (case, name)

    def test_antipodal_pair_takes_the_linear_branch(self, cli, tmp_path, models, streamed):
        x = read_tensors(models["x"])
        models = dict(models, x_neg=write_like(models["x"], tmp_path / "x_neg",
                                                {k: -v for k, v in x.items()}))
        out, _ = _run(cli, tmp_path, models, CASES["multislerp_antipodal"][0])
        for name, t in out.items():
            want = apply_method("multislerp", [x[name], -x[name]], params={"weight": [1, 1]})
            assert _rel(t, want) <= 1e-6 or want.abs().max() == 0
            assert t.abs().max() <= 1e-6 * x[name].abs().max()  # the weights cancel

    def test_balanced_antipodal_triple_is_the_kernels_error(self, cli, tmp_path, models,
                                                            streamed):
        x = read_tensors(models["x"])
        models = dict(models, x_neg=write_like(models["x"], tmp_path / "x_neg",
                                                {k: -v for k, v in x.items()}))
        r = write_recipe(tmp_path, _recipe(models, (
            "    method: multislerp\n    from: [{model: x, weight: 1}, {model: x_neg, weight: 1}"
            ", {model: zero, weight: 0}]\n")))
        with pytest.raises(ValueError, match="weighted mean direction of the inputs is zero"):
            apply_method("multislerp", [x["lm_head.weight"], -x["lm_head.weight"],
                                        0 * x["lm_head.weight"]], params={"weight": [1, 1, 0]})
        result = cli("run", r, "-q")
        assert result.exit_code != 0
        assert "weighted mean direction of the inputs is zero" in result.output

    def test_pieces_and_workers_do_not_change_bytes(self, cli, tmp_path, models, streamed,
                                                    monkeypatch):
        step = CASES["karcher"][0]
        for d in "abc":
            (tmp_path / d).mkdir()
        first, _ = _run(cli, tmp_path / "a", models, step)
        monkeypatch.setattr("recipekit.graph.passes.PASS_ELEMS", 1 << 14)
        again, _ = _run(cli, tmp_path / "b", models, step)
        diff = [n for n in first if not torch.equal(first[n], again[n])]
        # other pieces fold other partial sums: equal to rounding, not bit for bit
        assert all(_rel(again[n], first[n]) <= 1e-6 for n in diff)
        r = write_recipe(tmp_path / "c", _recipe(models, step))
        assert cli("run", r, "-q", "--workers", "2").exit_code == 0
        workers = read_tensors(tmp_path / "c" / "out")
        assert all(torch.equal(first[n], workers[n]) for n in first)


class TestExactBelowHoldBytes:
    """Oracle: `apply_method` bit for bit: inputs within EXACT_BYTES keep the whole `Merge`."""

    @pytest.mark.parametrize("case", ["model_stock", "karcher", "multislerp", "nuslerp"])
    def test_whole_merge_stays(self, cli, tmp_path, models, case):
        step, kernel = CASES[case]
        out, plan = _run(cli, tmp_path, models, step)
        assert GramStats not in {type(n) for s in plan.plan.shards for t in s.tensors
                                 for n in t.node.inputs}
        inputs = {k: read_tensors(v) for k, v in models.items()}
        for name, t in out.items():
            assert torch.equal(t, kernel({k: v[name] for k, v in inputs.items()}).float())


class TestRowLocal:
    """Oracle: the whole kernel bit for bit; the variants run by rows (no whole tensor)."""

    @pytest.mark.parametrize("step,kernel", [
        ("    method: nuslerp\n    base: base\n    from: [{model: x, weight: 0.3}, "
         "{model: y, weight: 0.7}]\n    parameters: {nuslerp_flatten: false}\n",
         lambda t: apply_method("nuslerp", [t["x"], t["y"]], base=t["base"], params={
             "weight": [0.3, 0.7], "nuslerp_flatten": False})),
        ("    method: model_stock\n    base: base\n    from: [x, y, z]\n"
         "    parameters: {filter_wise: true}\n",
         lambda t: apply_method("model_stock", [t["x"], t["y"], t["z"]], base=t["base"],
                                params={"filter_wise": True})),
    ])
    def test_rows_equal_whole_kernel(self, cli, tmp_path, models, monkeypatch, step, kernel):
        monkeypatch.setattr("recipekit.plan.cost.CHUNK_ELEMS", 1 << 9)  # many row pieces
        out, plan = _run(cli, tmp_path, models, step)
        nodes = [t.node for s in plan.plan.shards for t in s.tensors]
        assert all(n.row_inputs() is not None for n in nodes if len(n.shape) >= 2)
        inputs = {k: read_tensors(v) for k, v in models.items()}
        for name, t in out.items():
            assert torch.equal(t, kernel({k: v[name] for k, v in inputs.items()}).float()), name

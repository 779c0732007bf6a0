"""steps/stream_merges.py: arcee_fusion, ramplus_tl and nuslerp by columns, streamed.

Oracles: the whole-tensor kernels (`ops.merge.apply_method`, with the per-tensor generator of
`ops.rng.tensor_generator` for arcee_fusion's sample) on the whole tensors —
* arcee_fusion and ramplus_tl: bit for bit, for random shapes (vectors, matrices, 3-D),
  dtypes (fp32, bf16, mergekit's `compute_dtype:`), pass pieces and output pieces, and
  above arcee_fusion's 10^6-element sample;
* nuslerp with `nuslerp_row_wise`: within 1e-6 relative of the kernel on fp64 copies and
  no farther from it than the fp32 kernel (fp64 column sums; the kernel sums in fp32);
end to end through recipes (reductions reading row pieces from the files, small output
pieces): the same, and the plan names no whole-tensor op; DELLA on vectors (formerly whole)
is the counter-mask formula of tests/steps/test_task_vectors.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from recipekit.graph import load
from recipekit.graph.passes import InMemorySource
from recipekit.ops.merge import apply_method
from recipekit.ops.rng import tensor_generator
from recipekit.steps.stream_merges import (
    ColumnCombine,
    FusionMerge,
    FusionThreshold,
    RamPlusMerge,
    RamPlusScales,
    streamed_merge,
)

from tests.helpers.builders import make_model, read_tensors, split_rows, write_like
from tests.helpers.recipes import write_recipe

CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float64: "F64"}
RAM_PARAMS = {"r": 0.3, "alpha": 0.5, "epsilon": 0.4}
COLUMNS = {"weight": (0.3, 0.7), "nuslerp_flatten": False, "nuslerp_row_wise": True}


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """A base ``a`` and two related inputs (a + noise, so that some changes are small)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    return {"a": a.to(dtype), "b": (a + 0.5 * torch.randn(shape, generator=g)).to(dtype),
            "c": (a + torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) > 0.5)
                  ).to(dtype)}


def _nodes(method: str, values: dict[str, torch.Tensor], *, native: bool = False,
           params: dict | None = None):
    code = CODES[values["a"].dtype]
    loads = {k: load(k, k, tuple(v.shape), code) for k, v in values.items()}
    if method == "arcee_fusion":
        operands, base = (loads["b"],), loads["a"]
    elif method == "ramplus_tl":
        operands, base = (loads["b"], loads["c"]), loads["a"]
    else:
        operands, base = (loads["b"], loads["c"]), loads["a"]
    dtype = code if native else "F32"
    return streamed_merge(method, operands, base, params or {}, seed=7, tensor="t",
                          dtype=dtype, native=native)


def _evaluate(node, values: dict[str, torch.Tensor], pass_rows: list[int],
              out_rows: list[int]) -> torch.Tensor:
    """The node's value: its reduction over pass pieces cycling through ``pass_rows`` rows
    (a vector: one piece), then its rows over pieces of ``out_rows`` (at least `row_block`)."""
    reduction = next(x for x in node.inputs if x.__class__.__name__ in (
        "FusionThreshold", "RamPlusScales", "NuslerpColumns"))
    streamed = [values[x.source] for x in reduction.inputs]
    rows = streamed[0].shape[0]
    bounds = reduction.bounds() if len(streamed[0].shape) == 1 and isinstance(
        reduction, FusionThreshold) else split_rows(rows, pass_rows)
    result = reduction.reduce(InMemorySource(streamed, bounds), ())
    sizes = [max(n, node.row_block) for n in out_rows]
    parts = []
    for lo, hi in split_rows(rows, sizes):
        args = tuple(result if x is reduction else values[x.source][lo:hi] for x in node.inputs)
        parts.append(node.compute_rows(args, lo, hi))
    return torch.cat(parts)


def _kernel(method: str, values: dict[str, torch.Tensor], *, native: bool = False,
            params: dict | None = None) -> torch.Tensor:
    from recipekit.ops.precision import native_dtype

    a, b, c = values["a"], values["b"], values["c"]
    if method == "arcee_fusion":
        call = lambda: apply_method(method, [b], base=a,  # noqa: E731
                                    generator=tensor_generator(7, "t"))
    elif method == "ramplus_tl":
        call = lambda: apply_method(method, [b, c], base=a, params=params)  # noqa: E731
    else:
        call = lambda: apply_method(method, [b, c], base=a, params=params)  # noqa: E731
    if not native:
        return call().float()
    with native_dtype():
        return call().to(a.dtype)


def _random_cases(n: int) -> list[tuple[tuple[int, ...], list[int], list[int]]]:
    """(shape, pass piece rows, output piece rows) drawn from a fixed seed."""
    rng = random.Random(18)
    cases = []
    for _ in range(n):
        ndim = rng.choice([1, 2, 2, 3])
        shape = tuple(rng.randint(1 if d else 2, 40 if ndim > 1 else 300) for d in range(ndim))
        if ndim > 1 and shape[-1] < 2:
            shape = (*shape[:-1], 2)
        cases.append((shape, [rng.randint(1, 9) for _ in range(3)],
                      [rng.randint(1, 9) for _ in range(3)]))
    return cases


class TestBitForBit:
    """Oracle: the whole kernel, bit for bit, whatever the pieces."""

    @pytest.mark.parametrize("dtype,native", [(torch.float32, False), (torch.bfloat16, False),
                                              (torch.bfloat16, True)],
                             ids=["fp32", "bf16", "bf16-native"])
    @pytest.mark.parametrize("method", ["arcee_fusion", "ramplus_tl"])
    @pytest.mark.parametrize("case", range(12))
    def test_random_shapes_and_pieces(self, method, dtype, native, case):
        shape, pass_rows, out_rows = _random_cases(12)[case]
        values = _inputs(shape, dtype, case)
        params = RAM_PARAMS if method == "ramplus_tl" else None
        node = _nodes(method, values, native=native, params=params)
        assert isinstance(node, FusionMerge if method == "arcee_fusion" else RamPlusMerge)
        got = _evaluate(node, values, pass_rows, out_rows)
        want = _kernel(method, values, native=native, params=params)
        assert got.dtype == want.dtype and torch.equal(got, want), (shape, pass_rows, out_rows)

    @pytest.mark.parametrize("shape", [(1100, 1000), (1_000_003,)], ids=["matrix", "vector"])
    def test_fusion_above_the_sample_size(self, shape):
        """Above 10^6 elements the quartiles come from the kernel's sampled indices."""
        values = _inputs(shape, torch.bfloat16, 3)
        node = _nodes("arcee_fusion", values)
        got = _evaluate(node, values, [97, 250, 13], [300, 77])
        want = _kernel("arcee_fusion", values)
        assert torch.equal(got, want)
        assert not torch.equal(want, values["a"].float())  # some values were taken from b

    def test_fusion_vectors_are_one_piece(self):
        """The softmax spans a vector, so its pieces are the whole vector (`row_block`)."""
        values = _inputs((300,), torch.float32, 1)
        node = _nodes("arcee_fusion", values)
        assert node.row_block == 300 and node.threshold.bounds() == [(0, 300)]
        matrix = _nodes("arcee_fusion", _inputs((30, 10), torch.float32, 1))
        assert matrix.row_block == 1

    def test_ramplus_counts_every_piece(self):
        """λ from the counts of a split tensor equals the whole tensor's (exact integers)."""
        values = _inputs((64, 8), torch.float32, 5)
        node = _nodes("ramplus_tl", values, params=RAM_PARAMS)
        scales = node.scales
        assert isinstance(scales, RamPlusScales)
        parts = [scales.reduce(InMemorySource([values[x.source] for x in scales.inputs],
                                              split_rows(64, [k])), ()) for k in (1, 5, 64)]
        assert all(torch.equal(parts[0], p) for p in parts)


class TestColumns:
    """Oracle: the nuslerp kernel (`nuslerp_row_wise`), within 1e-6 relative of its fp64
    result and no farther from the fp32 kernel than that kernel is from fp64."""

    @pytest.fixture(autouse=True)
    def _streams(self, monkeypatch):
        monkeypatch.setattr("recipekit.plan.cost.EXACT_BYTES", 0)

    @pytest.mark.parametrize("case", range(8))
    @pytest.mark.parametrize("with_base", [True, False])
    def test_random_shapes_and_pieces(self, case, with_base):
        shape, pass_rows, out_rows = _random_cases(40)[case * 5 % 40]
        if len(shape) < 2:
            shape = (shape[0] % 40 + 2, 3)
        values = _inputs(shape, torch.float32, case)
        params = dict(COLUMNS)
        node = _nodes("nuslerp", values, params=params)
        if not with_base:
            loads = {k: load(k, k, shape, "F32") for k in "bc"}
            node = streamed_merge("nuslerp", (loads["b"], loads["c"]), None, params, seed=0,
                                  tensor="t", dtype="F32", native=False)
        assert isinstance(node, ColumnCombine)
        got = _evaluate(node, values, pass_rows, out_rows)
        kernel_params = dict(params, weight=[0.3, 0.7])
        base = values["a"] if with_base else None
        want = apply_method("nuslerp", [values["b"], values["c"]], base=base,
                            params=kernel_params)
        exact = apply_method("nuslerp", [values["b"].double(), values["c"].double()],
                             base=None if base is None else base.double(),
                             params=kernel_params)
        assert _rel(got, exact) <= 1e-6
        assert _rel(got, want) <= max(1e-6, 2 * _rel(want, exact))

    def test_collinear_and_zero_columns(self):
        """A column where b = 2a takes the linear branch; a zero column is orthogonal."""
        values = _inputs((16, 4), torch.float32, 2)
        values["c"] = 2 * values["b"]
        values["b"][:, 1] = 0
        loads = {k: load(k, k, (16, 4), "F32") for k in "bc"}
        node = streamed_merge("nuslerp", (loads["b"], loads["c"]), None, dict(COLUMNS), seed=0,
                              tensor="t", dtype="F32", native=False)
        got = _evaluate(node, values, [3], [5])
        want = apply_method("nuslerp", [values["b"], values["c"]],
                            params=dict(COLUMNS, weight=[0.3, 0.7]))
        assert _rel(got, want) <= 1e-6

    def test_small_tensors_keep_the_exact_kernel(self, monkeypatch):
        monkeypatch.undo()
        loads = {k: load(k, k, (16, 4), "F32") for k in "abc"}
        assert streamed_merge("nuslerp", (loads["b"], loads["c"]), loads["a"], dict(COLUMNS),
                              seed=0, tensor="t", dtype="F32", native=False) is None


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item() or 1.0
    return (got.double() - want.double()).abs().max().item() / scale


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream_merges")
    base = make_model("llama", d / "base", layers=2, seed=0, dtype=torch.bfloat16)
    tensors = read_tensors(base)
    out = {"base": base}
    for i, name in enumerate(("x", "y")):
        g = torch.Generator().manual_seed(20 + i)
        out[name] = write_like(base, d / name, {
            k: (v.float() + 0.02 * torch.randn(v.shape, generator=g)
                * (torch.rand(v.shape, generator=g) > 0.4)).to(v.dtype)
            for k, v in tensors.items()})
    return out


STEPS = {
    "arcee_fusion": ("    method: arcee_fusion\n    from: [base, x]\n",
                     lambda t, name: apply_method("arcee_fusion", [t["x"]], base=t["base"],
                                                  generator=tensor_generator(0, name))),
    "ramplus_tl": ("    method: ramplus_tl\n    base: base\n    from: [x, y]\n"
                   "    parameters: {r: 0.5, alpha: 0.3, epsilon: 0.001}\n",
                   lambda t, name: apply_method("ramplus_tl", [t["x"], t["y"]], base=t["base"],
                                                params={"r": 0.5, "alpha": 0.3,
                                                        "epsilon": 0.001})),
    "arcee_fusion_native": ("    method: arcee_fusion\n    from: [base, x]\n"
                            "    compute_dtype: bfloat16\n", None),
}


class TestEndToEnd:
    """Oracle: the whole kernel on the loaded tensors, bit for bit; reductions read row
    pieces from the files (HOLD_BYTES = 0) in small passes, outputs in small pieces."""

    @pytest.fixture(autouse=True)
    def _small_pieces(self, monkeypatch):
        monkeypatch.setattr("recipekit.plan.cost.HOLD_BYTES", 0)
        monkeypatch.setattr("recipekit.plan.cost.EXACT_BYTES", 0)
        monkeypatch.setattr("recipekit.plan.cost.CHUNK_ELEMS", 1 << 9)
        monkeypatch.setattr("recipekit.graph.passes.PASS_ELEMS", 1 << 10)

    def _run(self, cli, tmp_path, trio, step):
        import recipekit.api

        lines = "".join(f"  {k}: {v}\n" for k, v in trio.items())
        r = write_recipe(tmp_path, f"recipekit: 1\nmodels:\n{lines}steps:\n  - name: m\n"
                         f"    op: merge\n{step}output: {{path: ./out}}\n")
        result = cli("run", r, "-q")
        assert result.exit_code == 0, result.output
        return read_tensors(tmp_path / "out"), recipekit.api.plan(r, warn=False)

    @pytest.mark.parametrize("method", ["arcee_fusion", "ramplus_tl", "arcee_fusion_native"])
    def test_equals_whole_kernel_and_plan_streams(self, cli, tmp_path, trio, method):
        from recipekit.ops.precision import native_dtype

        step, kernel = STEPS[method]
        out, plan = self._run(cli, tmp_path, trio, step)
        assert plan.whole_tensor is None
        kinds = {type(t.node) for s in plan.plan.shards for t in s.tensors}
        assert kinds & {FusionMerge, RamPlusMerge}
        inputs = {k: read_tensors(v) for k, v in trio.items()}
        for name, t in out.items():
            tensors = {k: v[name] for k, v in inputs.items()}
            if kernel is None:  # mergekit's way: the kernel in bf16 on bf16 inputs
                with native_dtype():
                    want = STEPS["arcee_fusion"][1](tensors, name).to(t.dtype)
            else:
                want = kernel(tensors, name).to(t.dtype)
            assert torch.equal(t, want), name

    def test_nuslerp_by_columns(self, cli, tmp_path, trio):
        out, plan = self._run(cli, tmp_path, trio, (
            "    method: nuslerp\n    base: base\n    from: [{model: x, weight: 0.3}, "
            "{model: y, weight: 0.7}]\n    parameters: {nuslerp_flatten: false, "
            "nuslerp_row_wise: true}\n"))
        assert plan.whole_tensor is None
        inputs = {k: read_tensors(v) for k, v in trio.items()}
        params = dict(COLUMNS, weight=[0.3, 0.7])
        for name, t in out.items():
            want = apply_method("nuslerp", [inputs["x"][name], inputs["y"][name]],
                                base=inputs["base"][name], params=params)
            # bf16 output: the fp64 sums change a rounding at most
            assert _rel(t, want) <= 2 ** -7, name

    def test_della_on_vectors_streams(self, cli, tmp_path, trio):
        """DELLA ranks a vector as one row: it streams in one piece (`row_block`), with the
        counter masks of every other tensor (test_task_vectors' formula and step)."""
        from tests.steps import test_task_vectors as tv

        out, plan = self._run(cli, tmp_path, trio, "    method: della\n    base: base\n"
                              + tv.STEPS["della"])
        assert plan.whole_tensor is None
        b, x, y = (read_tensors(trio[k]) for k in ("base", "x", "y"))
        vectors = [n for n in out if b[n].dim() == 1]
        assert vectors
        for name in vectors:
            want = tv.counter_formula("della", b[name], [x[name], y[name]], name)
            assert torch.equal(out[name], want), name


class TestVectorsAreOneRow:
    """Oracle: the whole kernel bit for bit. A whole-kernel `Merge` of a vector (the exact
    kernel the Gram methods keep for small tensors) runs as one row piece, so the plan does not
    name it as a whole-tensor op, even when the executor chunks it."""

    @pytest.mark.parametrize("method,step,params", [
        ("nuslerp", "{model: x, weight: 0.3}, {model: y, weight: 0.7}]\n    parameters: "
         "{nuslerp_flatten: false, nuslerp_row_wise: true}\n",
         {"weight": [0.3, 0.7], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
        ("model_stock", "x, y]\n", {}),
    ])
    def test_vector_merges_in_one_piece(self, cli, tmp_path, trio, monkeypatch, method, step,
                                        params):
        import recipekit.api
        from recipekit.plan.cost import chunkable, reads_whole_tensor
        from recipekit.steps.merge import Merge

        monkeypatch.setattr("recipekit.plan.cost.CHUNK_ELEMS", 1 << 4)  # vectors chunk too
        lines = "".join(f"  {k}: {v}\n" for k, v in trio.items())
        r = write_recipe(tmp_path, f"recipekit: 1\nmodels:\n{lines}steps:\n  - name: m\n"
                         f"    op: merge\n    method: {method}\n    base: base\n    from: ["
                         f"{step}output: {{path: ./out}}\n")
        result = cli("run", r, "-q")
        assert result.exit_code == 0, result.output
        plan = recipekit.api.plan(r, warn=False)
        vectors = [t.node for s in plan.plan.shards for t in s.tensors
                   if isinstance(t.node, Merge) and len(t.node.shape) == 1]
        assert vectors and all(n.row_block == n.shape[0] for n in vectors)
        assert not any(reads_whole_tensor(n) for n in vectors)
        assert all(chunkable(n) for n in vectors)
        out = read_tensors(tmp_path / "out")
        inputs = {k: read_tensors(v) for k, v in trio.items()}
        for n in vectors:
            name = next(t.name for s in plan.plan.shards for t in s.tensors if t.node is n)
            want = apply_method(method, [inputs["x"][name], inputs["y"][name]],
                                base=inputs["base"][name], params=params)
            assert torch.equal(out[name], want.to(out[name].dtype)), name

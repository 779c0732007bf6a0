"""steps/task_vectors.py: TIES, breadcrumbs, DARE and DELLA streamed in row pieces, end to end.

Oracles, through recipes run by the CLI on tiny llamas (fp32, and bf16 whose task vectors tie
at the cut-offs):
* ties and breadcrumbs_ties: the whole-tensor kernel (`ops.merge.apply_method`, stable sorts)
  on the loaded tensors, bit for bit;
* dare_ties and della: the same formula with the counter-based masks of ops/rng.py recomputed
  here (`counter_formula`); with ``random_masks: mergekit``, `apply_method` drawing from
  ``ops.rng.tensor_generator(seed, tensor)`` (the whole-tensor draw from before streaming);
* the bytes do not depend on how the reductions read: from the files in row pieces
  (`plan.cost.HOLD_BYTES` = 0, the executor's `_FileSource`), in many small pieces
  (`graph.passes.PASS_ELEMS`), or with 1 or 2 piece workers.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from recipekit.graph import passes
from recipekit.merge import METHODS, resolve_params
from recipekit.ops.merge import apply_method
from recipekit.ops.rng import DRAW_BITS, counter_draw, tensor_generator
from recipekit.ops.sparsify import RESCALE_EPS, della_keep_probabilities
from recipekit.ops.task_arithmetic import combine_task_vectors
from recipekit.steps.task_vectors import stream_key

from tests.helpers.builders import make_model, read_tensors
from tests.helpers.l1 import NEIGHBOURS, exact_l1_norms, nudged
from tests.helpers.recipes import write_recipe
from tests.helpers.ties import compile_recipe, plan_bands


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def trio(request, tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("trio")
    return [make_model("llama", d / n, layers=2, seed=s, dtype=request.param)
            for n, s in (("base", 0), ("x", 1), ("y", 2))]


STEPS = {
    "ties": "    from: [{model: x, weight: 0.6, density: 0.5}, {model: y, weight: 0.4, "
            "density: 0.3}]\n",
    "breadcrumbs_ties": "    from: [{model: x, weight: 0.6, density: 0.8}, {model: y, weight: 0.7,"
                        " density: 0.5}]\n    parameters: {gamma: 0.05}\n",
    "dare_ties": "    from: [{model: x, weight: 0.6, density: 0.4}, {model: y, weight: 0.4, "
                 "density: 0.7}]\n    seed: 3\n",
    "della": "    from: [{model: x, weight: 0.6, density: 0.5}, {model: y, weight: 0.4, "
             "density: 0.4}]\n    parameters: {epsilon: 0.1}\n    seed: 5\n",
}
#: the per-tensor parameters of each STEPS entry, as `apply_method` takes them
PARAMS = {
    "ties": {"weight": [0.6, 0.4], "density": [0.5, 0.3]},
    "breadcrumbs_ties": {"weight": [0.6, 0.7], "density": [0.8, 0.5], "gamma": 0.05},
    "dare_ties": {"weight": [0.6, 0.4], "density": [0.4, 0.7]},
    "della": {"weight": [0.6, 0.4], "density": [0.5, 0.4], "epsilon": 0.1},
}
SEEDS = {"dare_ties": 3, "della": 5}


def run(cli, directory: Path, trio: list[Path], method: str, *extra: str,
        masks: str | None = None) -> dict[str, torch.Tensor]:
    directory.mkdir(parents=True, exist_ok=True)
    base, x, y = trio
    step = STEPS[method] + (f"    random_masks: {masks}\n" if masks else "")
    recipe = write_recipe(directory, (
        f"recipekit: 1\nmodels:\n  base: {base}\n  x: {x}\n  y: {y}\nsteps:\n  - name: m\n"
        f"    op: merge\n    method: {method}\n    base: base\n{step}output: {{path: ./out}}\n"))
    result = cli("run", recipe, "-q", *extra)
    assert result.exit_code == 0, result.output
    return read_tensors(directory / "out")


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((directory / "out").glob("*.safetensors"))}


def counter_formula(method: str, b: torch.Tensor, xs: list[torch.Tensor], name: str,
                    ulps: tuple[int, ...] = ()) -> torch.Tensor:
    """DARE/DELLA with the counter-based masks: τ_i = x_i − b in fp32, kept where the draw of
    (seed, tensor, i) is below ⌊d_i·2^24⌋ (DARE) or p·2^24 (DELLA's rank probabilities), L1
    rescaled with exact sums (the factor moved by ``ulps[i]`` fp32 ulps), then the
    task-arithmetic tail; rounded to the inputs' dtype."""
    spec = METHODS[method]
    kw = resolve_params(spec, PARAMS[method], len(xs))
    work = b.float()
    deltas = []
    for i, x in enumerate(xs):
        tau = x.float() - work
        rows = tau.shape[0] if tau.dim() else 1
        draw = counter_draw(stream_key(SEEDS[method], name, i), 0, rows,
                            tau.numel() // rows).reshape(tau.shape).double()
        d = kw["densities"][i]
        if method == "dare_ties":
            keep = draw < int(d * (1 << DRAW_BITS))
        else:
            p = della_keep_probabilities(tau, density=d, epsilon=kw["epsilon"][i])
            keep = draw < p.double() * (1 << DRAW_BITS)
        kept = tau * keep.float()
        before, after = exact_l1_norms(tau, kept)
        if kw["rescale"] and before >= RESCALE_EPS and after >= RESCALE_EPS:
            kept = kept * nudged(before / after, ulps[i] if i < len(ulps) else 0)
        deltas.append(kept)
    out = combine_task_vectors(work, torch.stack(deltas), kw["weights"], consensus="sum",
                               normalize=kw["normalize"], lambda_=kw["lambda_"])
    return out.to(b.dtype)


def generator_formula(method: str, b: torch.Tensor, xs: list[torch.Tensor], name: str
                      ) -> torch.Tensor:
    """The whole-tensor draw: `apply_method` with the generator seeded by (seed, tensor)."""
    return apply_method(method, xs, base=b, params=PARAMS[method],
                        generator=tensor_generator(SEEDS[method], name)).to(b.dtype)


class TestAgainstFormulas:
    """Oracle: the whole-tensor kernels (ties, breadcrumbs_ties) and the counter-mask formula
    (dare_ties, della; DELLA on a vector ranks the whole vector, in one piece), every tensor
    bit for bit."""

    @pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
    def test_magnitude_methods_equal_the_whole_kernel(self, cli, tmp_path, trio, method):
        out = run(cli, tmp_path, trio, method)
        b, x, y = (read_tensors(p) for p in trio)
        assert out.keys() == b.keys()
        for name, t in out.items():
            want = apply_method(method, [x[name], y[name]], base=b[name],
                                params=PARAMS[method]).to(b[name].dtype)
            assert torch.equal(t, want), name
        if next(iter(b.values())).dtype == torch.bfloat16:  # ties at cut-offs: the rule is used
            bands = plan_bands(compile_recipe(tmp_path / "recipe.yaml"))
            assert sum(int(band.sum()) for bs in bands.values() for band in bs) > 0

    def test_rescale_in_a_narrow_compute_dtype_sums_in_it(self, cli, tmp_path, trio):
        """`compute_dtype: bfloat16` with `rescale: true`: mergekit's two L1 norms are bf16
        sums and their quotient a bf16 division (`rescaled_masked_tensor` on bf16 tensors), as
        the whole kernel computes them inside `native_dtype`; the streamed rule rounds its
        fp64 sums to bf16 and divides there. Before, the factor was the exact quotient rounded
        (1.2578125 where mergekit has 1.265625), moving every kept delta by ~0.6%."""
        from recipekit.ops.precision import native_dtype

        base, x, y = trio
        recipe = write_recipe(tmp_path, (
            f"recipekit: 1\nmodels:\n  base: {base}\n  x: {x}\n  y: {y}\nsteps:\n"
            "  - name: m\n    op: merge\n    method: ties\n    base: base\n" + STEPS["ties"]
            + "    parameters: {rescale: true}\n    compute_dtype: bfloat16\n"
            "output: {path: ./out}\n"))
        result = cli("run", recipe, "-q")
        assert result.exit_code == 0, result.output
        out = read_tensors(tmp_path / "out")
        b, xs, ys = (read_tensors(p) for p in trio)
        for name, t in out.items():
            with native_dtype():
                want = apply_method("ties", [xs[name].bfloat16(), ys[name].bfloat16()],
                                    base=b[name].bfloat16(),
                                    params=dict(PARAMS["ties"], rescale=True))
            assert torch.equal(t, want.to(t.dtype)), name

    @pytest.mark.parametrize("method", ["dare_ties", "della"])
    def test_random_methods_use_the_counter_masks(self, cli, tmp_path, trio, method):
        out = run(cli, tmp_path, trio, method)
        b, x, y = (read_tensors(p) for p in trio)
        for name, t in out.items():  # DELLA ranks a vector whole: it streams in one piece
            # each L1 factor is the correctly rounded one or an fp32 neighbour (fp32 row sums)
            assert any(torch.equal(t, counter_formula(method, b[name], [x[name], y[name]], name,
                                                      (u, v)))
                       for u in NEIGHBOURS for v in NEIGHBOURS), name

    @pytest.mark.parametrize("method", ["dare_ties", "della"])
    def test_random_masks_mergekit_is_the_whole_tensor_draw(self, cli, tmp_path, trio, method):
        out = run(cli, tmp_path, trio, method, masks="mergekit")
        b, x, y = (read_tensors(p) for p in trio)
        differs = 0
        for name, t in out.items():
            assert torch.equal(t, generator_formula(method, b[name], [x[name], y[name]],
                                                    name)), name
            differs += not torch.equal(t, counter_formula(method, b[name], [x[name], y[name]],
                                                          name))
        assert differs > len(out) // 2  # the two draws are different masks

    def test_the_plan_streams(self, cli, tmp_path, trio):
        """The recipes above compile to the streamed nodes (not a whole-tensor `Merge`)."""
        from recipekit.graph import expression_nodes
        from recipekit.steps.task_vectors import PrunedMerge, PruneStats

        for method in STEPS:
            run(cli, tmp_path / method, trio, method)
            plan = compile_recipe(tmp_path / method / "recipe.yaml")
            nodes = {type(n) for s in plan.shards for t in s.tensors
                     for n in expression_nodes(t.node)}
            assert PrunedMerge in nodes and PruneStats in nodes, method


class TestHowReductionsRead:
    """Oracle: the default run's bytes. Reading row pieces from the files (HOLD_BYTES = 0),
    many small pieces run side by side on the pass threads (PASS_ELEMS = 128 values, DARE's
    and DELLA's L1 passes take 4× and 2×, `PruneStats.pass_scale`; output pieces of
    CHUNK_ELEMS = 256 values, up to 4× that, `PrunedMerge.piece_scale`) and 1 or 2 piece
    workers give the same shards."""

    @pytest.mark.parametrize("method", list(STEPS))
    def test_byte_identical(self, cli, tmp_path, trio, method, monkeypatch):
        from recipekit.run import execute

        run(cli, tmp_path / "default", trio, method)
        reference = shard_bytes(tmp_path / "default")
        pieces: list[int] = []
        original = execute._FileSource.map

        def counting(self, fn):
            pieces.append(len(self.bounds))
            return original(self, fn)

        monkeypatch.setattr(execute._FileSource, "map", counting)
        held: list[str] = []  # the threads that ran the pieces of held passes of 2+ pieces
        held_map = passes.InMemorySource.map

        def recording(self, fn, every=1):
            def piece(*args):
                held.append(threading.current_thread().name)
                return fn(*args)
            return held_map(self, piece if len(self.bounds[::every]) > 1 else fn, every=every)

        monkeypatch.setattr(passes.InMemorySource, "map", recording)
        monkeypatch.setattr("recipekit.graph.passes.PASS_ELEMS", 128)
        monkeypatch.setattr("recipekit.plan.cost.CHUNK_ELEMS", 256)
        run(cli, tmp_path / "small", trio, method)
        assert pieces == []  # small inputs: read whole once, passes over them in memory
        assert shard_bytes(tmp_path / "small") == reference
        # on the pass threads (run.execute.Runtime.passes), the same bytes
        assert len(held) > 20 and all(n.startswith("recipekit-pass") for n in held)
        monkeypatch.setattr("recipekit.plan.cost.HOLD_BYTES", 0)
        for workers in ("1", "2"):
            run(cli, tmp_path / f"files{workers}", trio, method, "--workers", workers)
            assert shard_bytes(tmp_path / f"files{workers}") == reference, workers
        assert pieces and max(pieces) >= 8  # passes read many row pieces from the files


class TestKeptMasks:
    """Oracle: the bytes and the number of draws. DELLA's L1 pass keeps each mask as bits for
    the output pass also where the inputs are read from the files in row pieces, up to
    `plan.cost.KEPT_BYTES` in all; above it the output pass draws and ranks every piece again:
    the same shards, twice the draws. DARE keeps them only where its inputs are held."""

    @pytest.mark.parametrize("method", ["dare_ties", "della"])
    def test_kept_from_the_files(self, cli, tmp_path, trio, method, monkeypatch):
        from recipekit.ops import stream_prune

        draws: list[int] = []
        original = stream_prune._mask

        def counting(*args, **kwargs):
            draws.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(stream_prune, "_mask", counting)
        monkeypatch.setattr("recipekit.plan.cost.HOLD_BYTES", 0)
        counts = {}
        for kept in (True, False):
            if not kept:
                monkeypatch.setattr("recipekit.plan.cost.KEPT_BYTES", 0)
            draws.clear()
            run(cli, tmp_path / str(kept), trio, method)
            counts[kept] = len(draws)
        assert shard_bytes(tmp_path / "True") == shard_bytes(tmp_path / "False")
        if method == "della":
            assert 0 < counts[True] < counts[False] <= 2 * counts[True]
        else:  # from the files DARE draws again
            assert 0 < counts[True] == counts[False]

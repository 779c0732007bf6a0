"""steps/task_vectors.py's streamed SCE (`SceStats`, `SceMerge`; ops/stream_sce.py).

Oracle: `ops.task_arithmetic.sce` (mergekit's formula, ties by lowest flat index) on the
loaded tensors: within 1e-6 relative on the streamed path (forced by `plan.cost.HOLD_BYTES = 0`
with pieces of ~1Ki values), including tensors with many tied variances, where the kept set
must be the kernel's exactly; bit for bit below `EXACT_BYTES` (the whole `Merge` stays).
"""

from __future__ import annotations

import pytest
import torch

import recipekit.api
from recipekit.ops.merge import apply_method
from recipekit.steps.task_vectors import SceMerge

from tests.helpers.builders import make_model, read_tensors, write_like
from tests.helpers.recipes import write_recipe


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("sce")
    base = make_model("llama", d / "base", layers=2, seed=0, dtype=torch.float32)
    tensors = read_tensors(base)
    out = {"base": base}
    for i, name in enumerate(("x", "y")):
        g = torch.Generator().manual_seed(20 + i)
        out[name] = write_like(base, d / name, {
            k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in tensors.items()})
    # task vectors on a coarse grid: many equal variances at any threshold
    for i, name in enumerate(("tx", "ty")):
        g = torch.Generator().manual_seed(30 + i)
        out[name] = write_like(base, d / name, {
            k: v + 0.01 * torch.randint(-2, 3, v.shape, generator=g).float()
            for k, v in tensors.items()})
    return out


def _run(cli, tmp_path, models, step):
    lines = "".join(f"  {k}: {v}\n" for k, v in models.items())
    r = write_recipe(tmp_path, f"recipekit: 1\nmodels:\n{lines}steps:\n  - name: m\n"
                     f"    op: merge\n    method: sce\n    base: base\n{step}"
                     "output: {path: ./out}\n")
    result = cli("run", r, "-q")
    assert result.exit_code == 0, result.output
    return read_tensors(tmp_path / "out"), recipekit.api.plan(r, warn=False)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item() or 1.0
    return (got.double() - want.double()).abs().max().item() / scale


CASES = [("x", "y", 0.3), ("x", "y", 1.0), ("x", "y", 0.0), ("tx", "ty", 0.5),
         ("tx", "ty", 0.1)]


class TestStreamed:
    """Oracle: `sce` on the whole tensors within 1e-6 relative (ω sums in fp64 pieces)."""

    @pytest.mark.parametrize("a,b,fraction", CASES)
    @pytest.mark.parametrize("sampled", [False, True])
    def test_matches_whole_kernel(self, cli, tmp_path, models, monkeypatch, a, b, fraction,
                                  sampled):
        """``sampled``: every tensor places its cut from a sample and a window pass, on which
        the energies ride (`ops.stream_sce._EnergyRide`), as a large tensor's do."""
        import recipekit.ops.stream_sce as ss

        monkeypatch.setattr("recipekit.plan.cost.HOLD_BYTES", 0)
        monkeypatch.setattr("recipekit.plan.cost.EXACT_BYTES", 0)
        monkeypatch.setattr("recipekit.graph.passes.PASS_ELEMS", 1 << 10)
        rode = []
        if sampled:
            monkeypatch.setattr("recipekit.ops.select.SAMPLE_MIN", 0)
            monkeypatch.setattr("recipekit.ops.select.SAMPLE_EVERY", 2)
            covers = ss._EnergyRide.covers
            monkeypatch.setattr(ss._EnergyRide, "covers", lambda self, cut: rode.append(
                covers(self, cut)) or rode[-1])
        out, plan = _run(cli, tmp_path, models,
                         f"    from: [{a}, {b}]\n    parameters: {{select_topk: {fraction}}}\n")
        assert plan.whole_tensor is None
        assert SceMerge in {type(t.node) for s in plan.plan.shards for t in s.tensors}
        base, x, y = (read_tensors(models[k]) for k in ("base", a, b))
        for name, t in out.items():
            want = apply_method("sce", [x[name], y[name]], base=base[name],
                                params={"select_topk": fraction})
            assert _rel(t, want) <= 1e-6, (name, _rel(t, want))
        if sampled and 0 < fraction < 1:
            assert any(rode)

    def test_task_vectors_formed_on_the_read_ahead_thread(self, cli, tmp_path, models,
                                                          monkeypatch):
        """Passes that read the files form their task vectors where the pieces are read
        (`RowSource.map`'s ``prepare``): the same bytes as forming them on the executor's
        thread (a source that does not read files)."""
        import threading

        from recipekit.ops import task_arithmetic
        from recipekit.run import execute

        monkeypatch.setattr("recipekit.plan.cost.HOLD_BYTES", 0)
        monkeypatch.setattr("recipekit.plan.cost.EXACT_BYTES", 0)
        monkeypatch.setattr("recipekit.graph.passes.PASS_ELEMS", 1 << 10)
        threads: list[str] = []
        formed = task_arithmetic.task_vectors

        def recording(*args, **kwargs):
            threads.append(threading.current_thread().name)
            return formed(*args, **kwargs)

        monkeypatch.setattr(task_arithmetic, "task_vectors", recording)
        step = "    from: [tx, ty]\n    parameters: {select_topk: 0.4}\n"
        for d in ("apart", "here"):
            (tmp_path / d).mkdir()
        apart, _ = _run(cli, tmp_path / "apart", models, step)
        assert any(name.startswith("recipekit-read") for name in threads), set(threads)
        threads.clear()
        monkeypatch.setattr(execute._FileSource, "reads_files", False)
        here, _ = _run(cli, tmp_path / "here", models, step)
        assert not any(name.startswith("recipekit-read") for name in threads), set(threads)
        assert apart.keys() == here.keys()
        for name, t in apart.items():
            assert torch.equal(t, here[name]), name


class TestExactBelowHoldBytes:
    """Oracle: `sce` bit for bit: small inputs keep the whole `Merge`."""

    def test_whole_merge_stays(self, cli, tmp_path, models):
        out, plan = _run(cli, tmp_path, models,
                         "    from: [tx, ty]\n    parameters: {select_topk: 0.5}\n")
        assert SceMerge not in {type(t.node) for s in plan.plan.shards for t in s.tensors}
        base, x, y = (read_tensors(models[k]) for k in ("base", "tx", "ty"))
        for name, t in out.items():
            assert torch.equal(t, apply_method("sce", [x[name], y[name]], base=base[name],
                                               params={"select_topk": 0.5}))

"""recipekit/ops/merge.py: the merge kernels and the METHODS registry.

Oracles, by class:
* the formulas of reference/merge-methods.md §2, recomputed directly here in fp64 (fp32 task
  vectors where the formula computes them in the compute dtype), within 1e-6;
* mergekit 0.1.5's own outputs (tests/goldens/merge/*.safetensors, written by
  tests/goldens/make_merge_goldens.py through ``merge_tensors``), within 1e-6, including the
  random methods, which mergekit drew from ``torch.manual_seed(s)`` and we from a generator
  seeded with s; for TIES and breadcrumbs outside the tie band only (tests/helpers/ties.py:
  mergekit breaks ties at a cut-off arbitrarily, we keep the lowest indices), and there the
  formula with the stable rule's masks;
* mergekit 0.1.5's registry (tests/goldens/merge/methods.json) for `METHODS`;
* with the side venv present (``-m mergekit``), goldens regenerated on the fly.
"""

from __future__ import annotations

import doctest
import functools
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from recipekit.merge import METHODS
from recipekit.ops import merge as mg
from recipekit.ops.merge import KERNELS, apply_method

from tests.helpers.ties import assert_equal_outside_band, call_bands, stable_formula

ROOT = Path(__file__).resolve().parent.parent.parent
GOLDENS = ROOT / "tests" / "goldens" / "merge"
GENERATOR = ROOT / "tests" / "goldens" / "make_merge_goldens.py"
MERGEKIT_PYTHON = ROOT / "bench" / ".venv-mergekit" / "bin" / "python"
ATOL = 1e-6


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    """Within atol elementwise; NaN and ±inf must sit at the same places."""
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=0,
                               equal_nan=True)


@pytest.fixture(scope="module")
def ft() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and three fine-tunes (base + 0.1·N(0,1)), fp32 [16, 24]."""
    base = randn(16, 24, seed=1)
    return base, [base + 0.1 * randn(16, 24, seed=2 + i) for i in range(3)]


def test_docstring_examples_run():
    """Oracle: the outputs written in the docstrings."""
    result = doctest.testmod(mg, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 15


# --------------------------------------------------------------------------------------------
# mergekit parity goldens


@functools.cache
def golden_inputs(folder: Path = GOLDENS) -> dict[str, torch.Tensor]:
    return load_file(folder / "inputs.safetensors")


def golden_cases(folder: Path = GOLDENS) -> list[tuple[str, dict]]:
    cases = []
    for method in METHODS:
        with safe_open(folder / f"{method}.safetensors", "pt") as f:
            cases += [(method, case) for case in json.loads(f.metadata()["cases"])]
    return cases


def golden_output(method: str, name: str, folder: Path = GOLDENS) -> torch.Tensor:
    with safe_open(folder / f"{method}.safetensors", "pt") as f:
        return f.get_tensor(name)


def run_case(method: str, case: dict, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Our result for a golden case, through `apply_method` (so the registry is used too)."""
    tensors = [inputs[k] for k in case["inputs"]]
    b = case["base"]
    others = [t for i, t in enumerate(tensors) if i != b]
    generator = gen(case["seed"]) if case["seed"] is not None else None
    return apply_method(method, others, base=None if b is None else tensors[b],
                        params=case["params"], generator=generator)


def close_to_mergekit(method: str, case: dict, inputs: dict[str, torch.Tensor],
                      ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """``ours`` within 1e-6 of mergekit's ``theirs``; for magnitude pruning whose cut-off
    magnitude is shared across the cut (the tie band, tests/helpers/ties.py), outside the band
    only, and everywhere equal to the formula with the stable rule's masks (equal magnitudes:
    lowest flat index kept first; `stable_formula`)."""
    tensors = [inputs[k] for k in case["inputs"]]
    b = case["base"]
    others = [t for i, t in enumerate(tensors) if i != b]
    base = None if b is None else tensors[b]
    bands = call_bands(method, others, base, case["params"])
    if bands is None or not any(band.any() for band in bands):
        close(ours, theirs)
        return
    assert_equal_outside_band(ours, theirs, bands, atol=ATOL, what=(method, case["name"]))
    assert torch.equal(ours, stable_formula(method, others, base, case["params"]))


GOLDEN_CASES = golden_cases()


class TestMergekitGoldens:
    """Oracle: mergekit 0.1.5's `merge_tensors` on the same fp32 inputs (and, for random
    methods, the same seed), within 1e-6; where mergekit raised, we raise ValueError.

    Tie rule: where a TIES/breadcrumbs cut-off magnitude is shared across the cut (the
    "quant" inputs, on a 1/32 grid), mergekit's non-stable sort keeps an arbitrary subset of
    the equal entries and we the lowest flat indices: those cases match mergekit outside the
    tie band (a minority of positions) and the stable-rule formula everywhere
    (`close_to_mergekit`)."""

    def test_every_method_has_goldens(self):
        assert {m for m, _ in GOLDEN_CASES} == set(METHODS)
        assert len(GOLDEN_CASES) >= 120

    def test_goldens_are_small(self):
        assert sum(p.stat().st_size for p in GOLDENS.iterdir()) < 300_000

    @pytest.mark.parametrize(("method", "case"), GOLDEN_CASES,
                             ids=[f"{m}-{c['name']}" for m, c in GOLDEN_CASES])
    def test_case(self, method, case):
        inputs = golden_inputs()
        if case["error"]:
            with pytest.raises(ValueError):
                run_case(method, case, inputs)
            return
        ours = run_case(method, case, inputs)
        assert ours.dtype == torch.float32
        close_to_mergekit(method, case, inputs, ours, golden_output(method, case["name"]))


@pytest.mark.mergekit
@pytest.mark.skipif(not MERGEKIT_PYTHON.exists(), reason="no bench/.venv-mergekit")
class TestMergekitLive:
    """Oracle: mergekit 0.1.5 itself, run now in the side venv: the regenerated goldens equal
    the committed ones bit for bit, and our kernels agree with them within 1e-6."""

    METHODS_LIVE = "slerp,ties,breadcrumbs,dare_ties,della,sce,model_stock,nuslerp"

    @pytest.fixture(scope="class")
    def fresh(self, tmp_path_factory) -> Path:
        out = tmp_path_factory.mktemp("goldens")
        subprocess.run([str(MERGEKIT_PYTHON), str(GENERATOR), "--out", str(out),
                        "--only", self.METHODS_LIVE], check=True, timeout=120)
        return out

    def test_regenerated_equals_committed(self, fresh):
        assert load_file(fresh / "inputs.safetensors").keys() == golden_inputs().keys()
        for key, tensor in load_file(fresh / "inputs.safetensors").items():
            assert torch.equal(tensor, golden_inputs()[key]), key
        assert (json.loads((fresh / "methods.json").read_text())
                == json.loads((GOLDENS / "methods.json").read_text()))
        for method in self.METHODS_LIVE.split(","):
            new, old = load_file(fresh / f"{method}.safetensors"), load_file(
                GOLDENS / f"{method}.safetensors")
            assert new.keys() == old.keys()
            for name in new:
                assert torch.equal(new[name].isnan(), old[name].isnan())
                assert torch.equal(new[name].nan_to_num(), old[name].nan_to_num()), name

    def test_ours_match_fresh(self, fresh):
        inputs = load_file(fresh / "inputs.safetensors")
        for method in self.METHODS_LIVE.split(","):
            with safe_open(fresh / f"{method}.safetensors", "pt") as f:
                for case in json.loads(f.metadata()["cases"]):
                    if not case["error"]:
                        close_to_mergekit(method, case, inputs, run_case(method, case, inputs),
                                          f.get_tensor(case["name"]))


# --------------------------------------------------------------------------------------------
# The registry


SCOPES = {"shared": "shared", "input": "per_input", "non_base": "per_non_base"}
POLICIES = {"error": "merge_present", "passthrough_singleton": "copy_single",
            "passthrough_base_singleton": "copy_base_single", "base_or_skip": "base_or_skip"}


class TestRegistry:
    """Oracle: mergekit 0.1.5's registry (methods.json) and reference §1 / §8."""

    MK = json.loads((GOLDENS / "methods.json").read_text())

    def test_the_methods_in_reference_order(self):
        """mergekit 0.1.5's 17 methods of reference §1, then those added since (issue 16)."""
        assert list(METHODS) == list(self.MK)
        assert len(METHODS) == 20

    @pytest.mark.parametrize("name", list(METHODS))
    def test_contract(self, name):
        spec, mk = METHODS[name], self.MK[name]
        assert spec.name == name
        assert spec.base == mk["base"]
        assert spec.needs_base == (mk["base"] == "required")
        with_base = mk["base"] != "ignored"
        required_base = int(mk["base"] == "required")
        min_nb = mk["min_non_base"] if mk["min_non_base"] is not None else max(
            0, mk["min_inputs"] - required_base)
        min_total = max(mk["min_inputs"], min_nb + required_base)
        if mk["max_inputs"] is not None:
            max_total = mk["max_inputs"]
        elif mk["max_non_base"] is not None:
            max_total = mk["max_non_base"] + int(with_base)
        else:
            max_total = None
        max_nb = mk["max_non_base"] if mk["max_non_base"] is not None else (
            None if mk["max_inputs"] is None else mk["max_inputs"] - required_base)
        assert (spec.min_inputs, spec.max_inputs) == (min_total, max_total)
        assert (spec.min_non_base, spec.max_non_base) == (min_nb, max_nb)
        assert spec.missing_tensor == POLICIES[mk["optional_tensor_policy"]]

    @pytest.mark.parametrize("name", list(METHODS))
    def test_parameters(self, name):
        ours = {p.name: (p.type, p.nullable, p.scope, p.required, p.default)
                for p in METHODS[name].params}
        theirs = {p["name"]: (p["type"], p["nullable"], SCOPES[p["scope"]], p["required"],
                              p["default"]) for p in self.MK[name]["params"]}
        assert ours == theirs

    @pytest.mark.parametrize("name", list(METHODS))
    def test_kwargs_exist_on_the_kernel(self, name):
        import inspect

        spec = METHODS[name]
        accepted = inspect.signature(KERNELS[spec.kernel]).parameters
        for p in spec.params:
            if spec.call == "pair_weights" and p.kwarg == "weights":
                assert {"weight_a", "weight_b"} <= set(accepted)
                continue
            assert p.kwarg in accepted, (name, p.kwarg)
        assert ("generator" in accepted) == spec.random

    def test_normalize_defaults_reference_section_8(self):
        normalize = {n: METHODS[n].defaults["normalize"] for n in METHODS
                     if "normalize" in METHODS[n].defaults}
        assert normalize == {
            "linear": True, "task_arithmetic": False, "ties": True, "dare_linear": False,
            "dare_ties": False, "breadcrumbs": False, "breadcrumbs_ties": False,
            "della": True, "della_linear": False}
        rescale = {n: METHODS[n].defaults["rescale"] for n in METHODS
                   if "rescale" in METHODS[n].defaults}
        assert rescale == {"task_arithmetic": False, "ties": False, "dare_linear": True,
                           "dare_ties": True, "breadcrumbs": False, "breadcrumbs_ties": False,
                           "della": True, "della_linear": True}
        assert {n for n in METHODS if METHODS[n].random} == {
            "dare_linear", "dare_ties", "della", "della_linear", "arcee_fusion"}

    def test_accessors(self):
        spec = METHODS["ties"]
        assert spec.required == ("weight",)
        assert spec.param("lambda").kwarg == "lambda_"
        assert spec.defaults["density"] == 1.0
        with pytest.raises(KeyError):
            spec.param("gamma")


class TestApplyMethod:
    """Oracle: the kernels called directly, and the contract in `METHODS`."""

    def test_same_as_kernels(self, ft):
        base, xs = ft
        close(apply_method("ties", xs, base=base, params={"weight": [1, 2, 3], "density": 0.5}),
              mg.ties(base, xs, weights=[1, 2, 3], densities=0.5), atol=0)
        close(apply_method("nuslerp", xs[:2], params={"weight": [1, 3],
                                                       "nuslerp_flatten": False}),
              mg.nuslerp(xs[0], xs[1], weight_a=1, weight_b=3, flatten=False), atol=0)
        close(apply_method("passthrough", [xs[0]], params={"scale": [2.0]}), 2 * xs[0], atol=0)
        close(apply_method("linear", xs, params={"weight": 1.0}),
              mg.linear(xs, weights=[1, 1, 1]), atol=0)

    @pytest.mark.parametrize(("name", "inputs", "base", "params", "message"), [
        ("frobnicate", 1, False, {}, "unknown merge method 'frobnicate'"),
        ("ties", 2, False, {"weight": 1}, "ties needs a base"),
        ("linear", 2, True, {"weight": 1}, "linear takes no base"),
        ("slerp", 2, True, {"t": 0.5}, "slerp takes 2 inputs"),
        ("model_stock", 1, True, {}, "model_stock takes 3 to any number of inputs"),
        ("nuslerp", 1, True, {"weight": 1}, "nuslerp takes 2 to 2 non-base inputs"),
        ("ties", 2, True, {}, "ties: missing required parameter weight"),
        ("ties", 2, True, {"weight": 1, "alpha": 2}, "ties: unknown parameter(s) alpha"),
        ("ties", 2, True, {"weight": [1, 2, 3]}, "parameter weight needs 2 value(s)"),
    ])
    def test_errors(self, ft, name, inputs, base, params, message):
        b, xs = ft
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            apply_method(name, xs[:inputs], base=b if base else None, params=params)


# --------------------------------------------------------------------------------------------
# Formula oracles


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.double()


class TestLerp:
    """Oracle: a + t(b − a) in fp64; t ∈ {0, 1} exact (torch.lerp's two-sided formula)."""

    @pytest.mark.parametrize("t", [0.25, 0.5, 0.75, -0.3, 1.4])
    def test_formula(self, t):
        a, b = randn(16, 24, seed=1), randn(16, 24, seed=2)
        close(mg.lerp(a, b, t=t), _f64(a) + t * (_f64(b) - _f64(a)))

    def test_endpoints_exact(self):
        a = torch.tensor([1e30, -3.0, 1e-30, 0.1])
        b = torch.tensor([-1e30, 7.0, 5.0, 0.2])
        assert torch.equal(mg.lerp(a, b, t=0.0), a)
        assert torch.equal(mg.lerp(a, b, t=1.0), b)
        ab, bb = a.bfloat16(), b.bfloat16()
        assert torch.equal(mg.lerp(ab, bb, t=0.0).bfloat16(), ab)
        assert torch.equal(mg.lerp(ab, bb, t=1.0).bfloat16(), bb)

    def test_dtypes(self):
        a = randn(4).bfloat16()
        assert mg.lerp(a, a, t=0.3).dtype == torch.float32
        assert mg.lerp(a.double(), a, t=0.3).dtype == torch.float64


class TestLinear:
    """Oracle: Σ w_j x_j / Σ w_j in fp64; Σw = 0 gives ±inf/NaN as in mergekit."""

    def test_formula(self, ft):
        base, xs = ft
        w = [0.5, -0.2, 0.9, 0.3]
        ins = [base, *xs]
        expected = sum(wj * _f64(x) for wj, x in zip(w, ins, strict=True))
        close(mg.linear(ins, weights=w, normalize=False), expected)
        close(mg.linear(ins, weights=w), expected / sum(w))

    def test_zero_weight_sum(self):
        a = torch.tensor([1.0, 0.0, -1.0])
        out = mg.linear([a, torch.zeros(3)], weights=[1.0, -1.0])
        assert out[0].item() == math.inf and out[1].isnan() and out[2].item() == -math.inf

    def test_weights_stay_fp32_for_bf16(self):
        """DESIGN: fp32 weights and accumulation, one rounding at the end."""
        a = randn(50).bfloat16()
        out = mg.linear([a, a], weights=[0.3, 0.7], normalize=False)
        close(out, _f64(a) * (0.3 + 0.7), atol=1e-6)

    def test_weight_count(self):
        with pytest.raises(ValueError, match="expected 2 value"):
            mg.linear([randn(2), randn(2)], weights=[1.0])

    def test_shapes_must_match(self):
        with pytest.raises(ValueError, match=r"input shapes differ: \[2\] and \[3\]"):
            mg.linear([randn(2), randn(3)], weights=[1, 1])


def slerp_ref(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    x, y = _f64(a).flatten(), _f64(b).flatten()
    na, nb = x.norm().item(), y.norm().item()
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    d = min(1.0, max(-1.0, torch.dot(x / na, y / nb).item()))
    if abs(d) > 0.9995:
        out = (1 - t) * x + t * y
    else:
        th = math.acos(d)
        out = math.sin((1 - t) * th) / math.sin(th) * x + math.sin(t * th) / math.sin(th) * y
    return out.reshape(a.shape)


class TestSlerp:
    """Oracle: reference §2.2 in fp64 (whole tensor one vector, lerp when |cos| > 0.9995,
    norms ≤ 1e-8 count as 1, t unclamped)."""

    @pytest.mark.parametrize("t", [0.0, 0.3, 0.7, 1.0, -0.25, 1.5])
    def test_formula(self, t):
        a, b = randn(16, 24, seed=1), randn(16, 24, seed=2)
        close(mg.slerp(a, b, t=t), slerp_ref(a, b, t))

    def test_endpoints_exact(self):
        a, b = randn(16, 24, seed=1), randn(16, 24, seed=2)
        assert torch.equal(mg.slerp(a, b, t=0.0), a)
        assert torch.equal(mg.slerp(a, b, t=1.0), b)

    def test_parallel_and_antiparallel_lerp(self):
        a = randn(16, 24, seed=1)
        close(mg.slerp(a, 2 * a, t=0.3), 1.3 * _f64(a))
        close(mg.slerp(a, -a, t=0.3), 0.4 * _f64(a))
        near = a + 1e-3 * randn(16, 24, seed=5)
        close(mg.slerp(a, near, t=0.4), 0.6 * _f64(a) + 0.4 * _f64(near))

    def test_zero_tensors(self):
        a = randn(16, 24, seed=1)
        z = torch.zeros(16, 24)
        # cos = 0: θ = π/2, out = sin(tπ/2)·a
        close(mg.slerp(z, a, t=0.5), math.sin(math.pi / 4) * _f64(a))
        assert torch.equal(mg.slerp(z, z, t=0.5), z)

    def test_self(self):
        a = randn(16, 24, seed=1)
        close(mg.slerp(a, a, t=0.3), a)

    def test_1d_and_empty(self):
        a, b = randn(24, seed=1), randn(24, seed=2)
        close(mg.slerp(a, b, t=0.6), slerp_ref(a, b, 0.6))
        assert mg.slerp(torch.zeros(0, 4), torch.zeros(0, 4), t=0.5).shape == (0, 4)

    def test_chunked_reduction(self, monkeypatch):
        """More than one chunk (shrunk here) still gives the formula."""
        monkeypatch.setattr(mg, "SLERP_CHUNK", 100)
        a, b = randn(16, 24, seed=1), randn(16, 24, seed=2)
        close(mg.slerp(a, b, t=0.3), slerp_ref(a, b, 0.3))


def nuslerp_ref(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """S along the last axis of 2-D fp64 inputs."""
    rows = []
    for x, y in zip(v0, v1, strict=True):
        u0, u1 = x / max(x.norm().item(), 1e-7), y / max(y.norm().item(), 1e-7)
        c = min(1.0, max(-1.0, torch.dot(u0, u1).item()))
        if 1 - c * c <= 1e-16:
            rows.append((1 - t) * x + t * y)
        else:
            th = math.acos(c)
            rows.append((math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th))
    return torch.stack(rows)


class TestNuslerp:
    """Oracle: reference §2.3 in fp64 per vector: whole tensor, rows (last axis) or columns
    (axis 0); t = w_b/(w_a + w_b), 0.5 when the sum is ~0; base → slerp of task vectors."""

    @pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (False, False),
                                                       (False, True)])
    @pytest.mark.parametrize("with_base", [False, True])
    def test_formula(self, ft, flatten, row_wise, with_base):
        base, (a, b, _) = ft
        t = 0.7
        v0, v1 = (_f64(a - base), _f64(b - base)) if with_base else (_f64(a), _f64(b))
        if flatten:
            ref = nuslerp_ref(v0.reshape(1, -1), v1.reshape(1, -1), t).reshape(a.shape)
        elif row_wise:
            ref = nuslerp_ref(v0.T, v1.T, t).T
        else:
            ref = nuslerp_ref(v0, v1, t)
        if with_base:
            ref = ref + _f64(base)
        out = mg.nuslerp(a, b, weight_a=0.3, weight_b=0.7, base=base if with_base else None,
                         flatten=flatten, row_wise=row_wise)
        close(out, ref)

    def test_weights_to_t(self, ft):
        _, (a, b, _) = ft
        close(mg.nuslerp(a, b, weight_a=1.0, weight_b=-1.0),
              mg.nuslerp(a, b, weight_a=1.0, weight_b=1.0), atol=0)
        close(mg.nuslerp(a, b, weight_a=1.0, weight_b=-0.4),
              nuslerp_ref(_f64(a).reshape(1, -1), _f64(b).reshape(1, -1), -0.4 / 0.6)
              .reshape(a.shape))

    def test_zero_vector_is_orthogonal(self):
        x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
        z = torch.zeros(2, 2)
        out = mg.nuslerp(z, x, weight_a=1, weight_b=1, flatten=False)
        close(out, math.sin(math.pi / 4) * _f64(x))

    def test_1d_same_in_every_orientation(self):
        a, b = randn(24, seed=1), randn(24, seed=2)
        outs = [mg.nuslerp(a, b, weight_a=1, weight_b=2, flatten=f, row_wise=r)
                for f, r in ((True, False), (False, False), (False, True))]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])

    def test_self(self, ft):
        base, (a, _, _) = ft
        close(mg.nuslerp(a, a, weight_a=0.3, weight_b=0.7), a)
        close(mg.nuslerp(a, a, weight_a=0.3, weight_b=0.7, base=base), a)


def multislerp_ref(xs, w, base=None, normalize=True, eps=1e-8):
    x = torch.stack([_f64(t) for t in xs]).reshape(len(xs), -1)
    if base is not None:
        x = x - _f64(base).reshape(1, -1)
    w = torch.tensor(w, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    n = x.norm(dim=1, keepdim=True)
    u = x / (n + eps)
    m = (w[:, None] * u).sum(0)
    m = m / m.norm()
    g = u - (u @ m)[:, None] * m
    v = (w[:, None] * g).sum(0)
    s = v.norm() + eps
    r = (torch.cos(s) * m + torch.sin(s) / s * v) * (w * n[:, 0]).sum()
    r = r.reshape(xs[0].shape)
    return r if base is None else r + _f64(base)


class TestMultislerp:
    """Oracle: reference §2.4 in fp64 (one tangent-space step; M = 1 returns the input;
    vanishing mean: lerp for M = 2, error otherwise)."""

    def test_formula(self, ft):
        base, xs = ft
        w = [0.5, 0.3, 0.2]
        close(mg.multislerp(xs, weights=w), multislerp_ref(xs, w))
        close(mg.multislerp(xs, weights=w, base=base), multislerp_ref(xs, w, base))
        close(mg.multislerp(xs, weights=[1, 0.5, 0.25], base=base, normalize_weights=False),
              multislerp_ref(xs, [1, 0.5, 0.25], base, normalize=False))

    def test_single_input_returned(self, ft):
        base, xs = ft
        assert torch.equal(mg.multislerp(xs[:1], weights=[0.3], base=base), xs[0])

    def test_antipodal(self):
        a = randn(16, 24, seed=1)
        close(mg.multislerp([a, -a], weights=[0.5, 0.5]), torch.zeros(16, 24))
        with pytest.raises(ValueError, match="weighted mean direction"):
            mg.multislerp([a, -a, a], weights=[0.25, 0.5, 0.25])

    def test_self(self, ft):
        base, (a, _, _) = ft
        close(mg.multislerp([a, a], weights=[0.4, 0.6]), a)
        close(mg.multislerp([a, a, a], weights=[1, 1, 1], base=base), a)


def karcher_ref(xs, max_iter=10, tol=1e-5):
    alphas = [1 / len(xs)] * len(xs)
    x = [_f64(t).flatten() for t in xs]
    n = [v.norm() for v in x]
    valid = [i for i in range(len(x)) if n[i] > tol]
    a_hat = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    u = [x[i] / n[i] for i in valid]
    m = sum(a * ui for a, ui in zip(a_hat, u, strict=True))
    m = m / m.norm()
    for _ in range(max_iter):
        g = torch.zeros_like(m)
        for a, ui in zip(a_hat, u, strict=True):
            c = torch.clamp(m @ ui, -1, 1)
            phi = torch.arccos(c)
            if phi >= tol:
                g = g + a * phi / torch.sin(phi) * (ui - c * m)
        gn = g.norm()
        if gn < tol:
            break
        m = torch.cos(gn) * m + torch.sin(gn) * g / gn
        m = m / m.norm()
    return (sum(a * ni for a, ni in zip(alphas, n, strict=True)) * m).reshape(xs[0].shape)


class TestKarcher:
    """Oracle: reference §2.5 iterated in fp64; two equal-norm inputs give the great-circle
    midpoint; zero inputs do not count toward the direction."""

    def test_formula(self, ft):
        base, xs = ft
        close(mg.karcher(xs), karcher_ref(xs))
        close(mg.karcher([base, *xs]), karcher_ref([base, *xs]))
        close(mg.karcher(xs, max_iter=1), karcher_ref(xs, max_iter=1))

    def test_two_inputs_midpoint(self):
        a, b = randn(100, seed=1), randn(100, seed=2)
        a, b = a / a.norm() * 3, b / b.norm() * 3
        mid = _f64(a) / 3 + _f64(b) / 3
        close(mg.karcher([a, b]), 3 * mid / mid.norm())

    def test_zero_inputs(self):
        a, b = randn(16, 24, seed=1), randn(16, 24, seed=2)
        z = torch.zeros(16, 24)
        # the zero input does not steer the direction but counts in the scale (α = 1/3)
        direction = karcher_ref([a, b])
        scale = (a.norm() + b.norm()).item() / 3
        close(mg.karcher([z, a, b]), direction / direction.norm() * scale)
        assert torch.equal(mg.karcher([z, z]), z)

    def test_self_and_single(self):
        a = randn(16, 24, seed=1)
        close(mg.karcher([a, a, a]), a)
        assert torch.equal(mg.karcher([a]), a)


def gta_ref(base, xs, w, masks=None, consensus=False, normalize=False, lam=1.0,
            rescale=False):
    """Reference §2.6 in fp64 given each model's keep mask (None: keep all)."""
    taus = [_f64(x - base) for x in xs]  # τ in the compute dtype (fp32), then fp64
    kept = []
    for i, tau in enumerate(taus):
        if masks is not None and masks[i] is not None:
            m = _f64(masks[i])
            k = tau * m
            if rescale and k.abs().sum() > 1e-7:
                k = k * tau.abs().sum() / k.abs().sum()
            tau = k
        kept.append(tau)
    deltas = torch.stack([wi * k for wi, k in zip(w, kept, strict=True)])
    wt = torch.tensor(w, dtype=torch.float64).reshape(-1, *[1] * base.dim())
    if consensus:
        s = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).double()
        agree = (torch.sign(deltas) == s).double()
        total = (deltas * agree).sum(0)
        div = (wt * agree).sum(0)
        div[div == 0] = 1
    else:
        total = deltas.sum(0)
        div = wt.sum(0)
        div[div.abs() < 1e-8] = 1
    if normalize:
        total = total / div
    return _f64(base) + lam * total


def topk_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    k = max(1, math.floor(density * tau.numel()))
    thr = _f64(tau).abs().flatten().sort(descending=True).values[k - 1]
    return (_f64(tau).abs() >= thr).double()


def breadcrumbs_mask(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = tau.numel()
    keep, top = math.floor(density * n), math.floor(gamma * n)
    bot = max(0, n - keep - top)
    mask = torch.zeros(n, dtype=torch.float64)
    mask[_f64(tau).abs().flatten().argsort()[bot:bot + keep]] = 1
    return mask.reshape(tau.shape)


class TestTaskArithmeticFamily:
    """Oracle: reference §2.6 recomputed in fp64 from the keep masks (magnitude and
    breadcrumbs masks from an fp64 sort; DARE / DELLA masks drawn from the same generator
    state), with each method's defaults from §8."""

    W = [0.5, -0.3, 0.8]

    def test_task_arithmetic(self, ft):
        base, xs = ft
        close(mg.task_arithmetic(base, xs, weights=self.W), gta_ref(base, xs, self.W))
        close(mg.task_arithmetic(base, xs, weights=self.W, normalize=True, lambda_=0.8),
              gta_ref(base, xs, self.W, normalize=True, lam=0.8))
        # density and rescale are accepted and ignored
        close(mg.task_arithmetic(base, xs, weights=self.W, densities=0.1, rescale=True),
              gta_ref(base, xs, self.W))

    def test_negative_weight(self, ft):
        base, (a, _, _) = ft
        close(mg.task_arithmetic(base, [a], weights=[-1.0], normalize=True), a)
        close(mg.ties(base, [a], weights=[-1.0]), a)
        close(mg.task_arithmetic(base, [a], weights=[-1.0]), 2 * _f64(base) - _f64(a))

    def test_divisor_guards(self, ft):
        base, (a, b, _) = ft
        # Σw = 0 without consensus: D = 1
        close(mg.task_arithmetic(base, [a, b], weights=[1.0, -1.0], normalize=True),
              _f64(base) + _f64(a - base) - _f64(b - base))
        # no agreeing contributor (all deltas zero here): D = 1, Δ = 0
        assert torch.equal(mg.ties(base, [base, base], weights=[1, 1]), base)

    @pytest.mark.parametrize("density", [0.3, 0.5, [0.2, 0.6, 0.9]])
    def test_ties(self, ft, density):
        base, xs = ft
        ds = density if isinstance(density, list) else [density] * 3
        masks = [topk_mask(x - base, d) for x, d in zip(xs, ds, strict=True)]
        close(mg.ties(base, xs, weights=self.W, densities=density),
              gta_ref(base, xs, self.W, masks, consensus=True, normalize=True))
        close(mg.ties(base, xs, weights=self.W, densities=density, normalize=False,
                      rescale=True, int8_mask=True),
              gta_ref(base, xs, self.W, masks, consensus=True, rescale=True))

    @pytest.mark.parametrize(("name", "consensus"), [("breadcrumbs", False),
                                                     ("breadcrumbs_ties", True)])
    def test_breadcrumbs(self, ft, name, consensus):
        base, xs = ft
        ds, gs = [0.8, 0.5, 0.9], [0.05, 0.1, 0.2]
        masks = [breadcrumbs_mask(x - base, d, g) for x, d, g in zip(xs, ds, gs, strict=True)]
        close(getattr(mg, name)(base, xs, weights=self.W, densities=ds, gamma=gs),
              gta_ref(base, xs, self.W, masks, consensus=consensus))

    @pytest.mark.parametrize(("name", "consensus", "normalize"), [
        ("dare_linear", False, False), ("dare_ties", True, False)])
    def test_dare(self, ft, name, consensus, normalize):
        base, xs = ft
        g = gen(7)
        masks = [torch.bernoulli(torch.full(base.shape, 0.4), generator=g) for _ in xs]
        close(getattr(mg, name)(base, xs, weights=self.W, densities=0.4, generator=gen(7)),
              gta_ref(base, xs, self.W, masks, consensus=consensus, normalize=normalize,
                      rescale=True))

    @pytest.mark.parametrize(("name", "consensus", "normalize"), [
        ("della", True, True), ("della_linear", False, False)])
    def test_della(self, ft, name, consensus, normalize):
        base, xs = ft
        g = gen(9)
        masks = []
        for x in xs:
            tau = x - base
            ranks = tau.abs().argsort(dim=1).argsort(dim=1).double()
            p = (0.5 - 0.15) + ranks / 23 * 2 * 0.15
            masks.append(torch.bernoulli(p.float(), generator=g))
        close(getattr(mg, name)(base, xs, weights=self.W, densities=0.5, generator=gen(9)),
              gta_ref(base, xs, self.W, masks, consensus=consensus, normalize=normalize,
                      rescale=True))

    @pytest.mark.parametrize("name", ["ties", "dare_linear", "dare_ties", "breadcrumbs",
                                      "breadcrumbs_ties", "della", "della_linear"])
    def test_density_one_is_no_pruning(self, ft, name):
        base, xs = ft
        spec = METHODS[name]
        consensus = name in ("ties", "dare_ties", "breadcrumbs_ties", "della")
        kw = {"generator": gen(0)} if spec.random else {}
        close(getattr(mg, name)(base, xs, weights=self.W, densities=1.0, **kw),
              gta_ref(base, xs, self.W, consensus=consensus,
                      normalize=spec.defaults["normalize"]))

    def test_no_models_returns_base(self, ft):
        base, _ = ft
        out = mg.ties(base, [], weights=[])
        assert torch.equal(out, base) and out is not base

    def test_random_needs_generator(self, ft):
        base, xs = ft
        with pytest.raises(ValueError, match="pass a torch.Generator"):
            mg.generalized_task_arithmetic(base, xs, weights=self.W, densities=0.5,
                                           sparsify="random")
        with pytest.raises(ValueError, match="unknown sparsifier"):
            mg.generalized_task_arithmetic(base, xs, weights=self.W, sparsify="topk")
        with pytest.raises(ValueError, match="unknown sign consensus"):
            mg.generalized_task_arithmetic(base, xs, weights=self.W, consensus="vote")

    @pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
    def test_reproducible_by_seed(self, ft, name):
        base, xs = ft
        fn = getattr(mg, name)
        a = fn(base, xs, weights=self.W, densities=0.5, generator=gen(1))
        b = fn(base, xs, weights=self.W, densities=0.5, generator=gen(1))
        c = fn(base, xs, weights=self.W, densities=0.5, generator=gen(2))
        assert torch.equal(a, b) and not torch.equal(a, c)

    def test_bf16_weights_stay_fp32(self):
        """DESIGN: weights are not rounded to bf16 (mergekit rounds them; 0.3 → 0.30078125)."""
        base = torch.zeros(8, dtype=torch.bfloat16)
        x = torch.ones(8, dtype=torch.bfloat16)
        out = mg.task_arithmetic(base, [x], weights=[0.3])
        assert out.dtype == torch.float32
        assert torch.equal(out, torch.full((8,), 0.3))


def sce_ref(base, xs, topk=1.0):
    d = torch.stack([_f64(x - base) for x in xs])
    if topk < 1:
        v = d.var(dim=0, unbiased=False)
        k = math.floor(int((v != 0).sum()) * topk)
        mask = torch.zeros_like(v)
        if k > 0:
            mask.view(-1)[v.flatten().argsort(descending=True)[:k]] = 1
        d = d * mask
    s = torch.where(d.sum(0) >= 0, 1.0, -1.0).double()
    e = (torch.sign(d) == s).double()
    c = (d ** 2).reshape(len(xs), -1).mean(1)
    omega = c / c.sum() if c.sum() >= 1e-6 else torch.full_like(c, 1 / len(xs))
    omega = omega.reshape(-1, *[1] * base.dim()) * e
    return _f64(base) + (omega * d).sum(0) / omega.sum(0).clamp(min=1e-6)


class TestSce:
    """Oracle: reference §2.7 in fp64 (variance top-k select, unweighted sign erase,
    energy weights with the absolute 1e-6 uniform fallback)."""

    @pytest.mark.parametrize("topk", [1.0, 0.3, 0.0])
    def test_formula(self, ft, topk):
        base, xs = ft
        close(mg.sce(base, xs, select_topk=topk), sce_ref(base, xs, topk))

    def test_small_deltas_get_uniform_weights(self, ft):
        base, _ = ft
        xs = [base + 1e-4 * randn(16, 24, seed=20 + i) for i in range(2)]
        close(mg.sce(base, xs), sce_ref(base, xs))

    def test_self_and_empty(self, ft):
        base, (a, _, _) = ft
        close(mg.sce(base, [a, a]), a)
        assert torch.equal(mg.sce(base, []), base)

    @pytest.mark.parametrize("shape", [(30, 200), (7, 13)])
    @pytest.mark.parametrize("m", [2, 3])
    @pytest.mark.parametrize(("dtype", "bits"), [(torch.float32, torch.int32),
                                                 (torch.float64, torch.int64)])
    def test_combine_bits_on_special_values(self, m, dtype, bits, shape):
        """`sce_combine` (two task vectors wholly in numpy on the CPU, more with their mask
        and weights in numpy) gives the bits of the formula in torch ops, NaN payloads and
        signed zeros included, also for a NaN or a negative ω; with a selection, the bits of
        combining the masked task vectors. 7×13: torch's loops without whole SIMD vectors.
        Where ω holds a NaN, a product of two NaNs has no fixed sign in torch itself (its
        vector and scalar loops return different operands'), so there the NaNs are compared
        as NaNs and every other value by its bits."""
        from recipekit.ops.task_arithmetic import sce_combine

        special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"),
                                -float("nan"), 1e38, -1e38, 1e-45, -3.5, 0.25, 7.0],
                               dtype=dtype)
        g = torch.Generator().manual_seed(m)
        deltas = special[torch.randint(len(special), (m, *shape), generator=g)]
        base = special[torch.randint(len(special), shape, generator=g)]
        keep = torch.rand(shape, generator=g) < 0.5
        for omega in (torch.rand(m, generator=g, dtype=dtype), torch.zeros(m, dtype=dtype),
                      torch.tensor([float("nan")] + [0.5] * (m - 1), dtype=dtype),
                      -torch.rand(m, generator=g, dtype=dtype)):
            for selection in (None, keep):
                d = deltas if selection is None else deltas * selection.to(dtype)
                weights = omega.reshape(m, 1, 1) * (torch.sign(d) == torch.where(
                    d.sum(dim=0) >= 0, 1.0, -1.0).to(dtype))
                want = base + (d * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)
                got = sce_combine(base, deltas, omega, False, selection)
                if omega.isnan().any():
                    assert torch.equal(got.isnan(), want.isnan())
                    got, want = got.nan_to_num(0.5), want.nan_to_num(0.5)
                assert torch.equal(got.view(bits), want.view(bits)), (omega, selection)

    @pytest.mark.parametrize("shape", [(2, 2048, 2048), (3, 256, 2048), (4, 1000, 3), (2, 5)])
    def test_energies_squared_into_scratch_give_the_stacks_bits(self, shape):
        """On one thread (the executor's, for whole kernels) the whole kernel squares one task
        vector at a time into its output buffer; the weights are those of squaring the whole
        stack (the mean's order is the same), and so is the merge."""
        from recipekit.ops.task_arithmetic import _sce_weights

        g = torch.Generator().manual_seed(len(shape))
        deltas = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 3
        scratch = torch.empty(shape[1:])
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(_sce_weights(deltas, scratch=scratch), _sce_weights(deltas))
        finally:
            torch.set_num_threads(threads)

    @pytest.mark.parametrize("int8_mask", [False, True])
    def test_combining_by_rows_gives_the_whole_tensors_bits(self, ft, monkeypatch, int8_mask):
        """The erase-and-combine runs by row pieces: pieces of one or a few rows (and a
        3-D tensor, a vector) give the bits of one piece over the whole tensor, zeros of
        both signs and sign conflicts included."""
        import recipekit.ops.task_arithmetic as ta

        base, xs = ft
        xs = [x.clone() for x in xs]
        xs[0][:3] = base[:3]  # zero task-vector rows: ±0 sums, no agreement
        xs[1][5] = base[5] - (xs[2][5] - base[5])  # opposite signs
        cases = [(base, xs), (base.reshape(4, -1, 6), [x.reshape(4, -1, 6) for x in xs]),
                 (base[0], [x[0] for x in xs])]
        for b, ys in cases:
            monkeypatch.setattr(ta, "COMBINE_ELEMS", 1 << 30)
            whole = ta.sce(b, ys, select_topk=0.5, int8_mask=int8_mask)
            monkeypatch.setattr(ta, "COMBINE_ELEMS", 7)
            pieces = ta.sce(b, ys, select_topk=0.5, int8_mask=int8_mask)
            assert torch.equal(whole.view(torch.int32), pieces.view(torch.int32))


def model_stock_ref(base, xs, filter_wise=False):
    shape = base.shape
    w0, ws = _f64(base), [_f64(x) for x in xs]
    if filter_wise:
        w0 = w0.reshape(-1, shape[-1]) if w0.dim() >= 2 else w0.reshape(1, -1)
        ws = [x.reshape(w0.shape) for x in ws]
    else:
        w0, ws = w0.reshape(1, -1), [x.reshape(1, -1) for x in ws]
    o = [x - w0 for x in ws]
    cos = []
    for i in range(len(o)):
        for j in range(i + 1, len(o)):
            nn = (o[i].norm(dim=-1) * o[j].norm(dim=-1)).clamp(min=1e-6)
            cos.append(((o[i] * o[j]).sum(-1) / nn).clamp(-1, 1))
    c = torch.stack(cos).mean(0)[:, None]
    n = len(ws)
    den = 1 + (n - 1) * c
    t = torch.where(den.abs() < 1e-6, 0.0, n * c / den)
    return (t * sum(ws) / n + (1 - t) * w0).reshape(shape)


class TestModelStock:
    """Oracle: reference §2.8 in fp64 (mean pairwise cosine of offsets, t = Nc/(1+(N−1)c)
    unclamped, t = 0 at the singularity)."""

    @pytest.mark.parametrize("filter_wise", [False, True])
    def test_formula(self, ft, filter_wise):
        base, xs = ft
        close(mg.model_stock(base, xs, filter_wise=filter_wise),
              model_stock_ref(base, xs, filter_wise))
        close(mg.model_stock(base, xs[:2], filter_wise=filter_wise),
              model_stock_ref(base, xs[:2], filter_wise))

    @pytest.mark.parametrize("filter_wise", [False, True])
    def test_blending_by_pieces_gives_the_whole_tensors_bits(self, ft, monkeypatch,
                                                             filter_wise):
        """The blend runs by pieces (rows with `filter_wise`, else flat): pieces of 7 values
        or one row give the bits of one piece over the tensor, for a matrix, a 3-D tensor
        and a vector, zeros of both signs included."""
        import recipekit.ops.task_arithmetic as ta

        base, xs = ft
        xs = [x.clone() for x in xs]
        xs[0][:2] = -0.0
        for b, ys in [(base, xs), (base.reshape(4, -1, 6), [x.reshape(4, -1, 6) for x in xs]),
                      (base[0], [x[0] for x in xs])]:
            monkeypatch.setattr(ta, "COMBINE_ELEMS", 1 << 30)
            whole = ta.model_stock(b, ys, filter_wise=filter_wise)
            monkeypatch.setattr(ta, "COMBINE_ELEMS", 7)
            pieces = ta.model_stock(b, ys, filter_wise=filter_wise)
            assert torch.equal(whole.view(torch.int32), pieces.view(torch.int32))

    def test_1d_filter_wise_is_one_row(self):
        base, x, y = randn(24, seed=1), randn(24, seed=2), randn(24, seed=3)
        assert torch.equal(mg.model_stock(base, [x, y], filter_wise=True),
                           mg.model_stock(base, [x, y]))

    def test_singular_and_negative(self):
        base = torch.zeros(10)
        d = randn(10, seed=1)
        assert torch.equal(mg.model_stock(base, [d, -d]), base)  # cos = −1 → t = 0
        # N = 2, cos = −0.3 → t = −0.6/0.7 (not clamped)
        e = torch.zeros(10)
        e[0], e[1] = -0.3, math.sqrt(1 - 0.09)
        u = torch.zeros(10)
        u[0] = 1.0
        t = 2 * -0.3 / 0.7
        close(mg.model_stock(base, [u, e]), t * (_f64(u) + _f64(e)) / 2)

    def test_needs_two_models(self, ft):
        base, xs = ft
        with pytest.raises(ValueError, match="at least 2 non-base"):
            mg.model_stock(base, xs[:1])

    def test_self(self, ft):
        base, (a, _, _) = ft
        close(mg.model_stock(base, [a, a]), a)


class TestNearswapPassthrough:
    """Oracle: ω = clamp(t/max(|a−b|, 1e-6), 0, 1), out = ωb + (1−ω)a; passthrough = scale·x."""

    def test_nearswap(self):
        a, b = randn(16, 24, seed=1), randn(16, 24, seed=2)
        for t in (0.01, 0.5):
            w = (t / (_f64(a) - _f64(b)).abs().clamp(min=1e-6)).clamp(0, 1)
            close(mg.nearswap(a, b, t=t), w * _f64(b) + (1 - w) * _f64(a))
        assert torch.equal(mg.nearswap(a, a, t=0.1), a)

    def test_passthrough(self):
        x = randn(5).bfloat16()
        out = mg.passthrough(x)
        assert out.dtype == torch.float32 and torch.equal(out.bfloat16(), x)
        close(mg.passthrough(x, scale=-0.5), -0.5 * _f64(x))


# --------------------------------------------------------------------------------------------
# Properties of every kernel


SELF_CASES = {
    "linear": {"weight": [0.3, 0.7]},
    "slerp": {"t": 0.3},
    "nuslerp": {"weight": [0.3, 0.7]},
    "multislerp": {"weight": [0.3, 0.7]},
    "karcher": {},
    "task_arithmetic": {"weight": [0.25, 0.75]},
    "ties": {"weight": [1.0, 1.0], "density": 1.0},
    "dare_linear": {"weight": [0.5, 0.5], "density": 1.0},
    "dare_ties": {"weight": [1.0, 1.0], "density": 1.0, "normalize": True},
    "breadcrumbs": {"weight": [0.5, 0.5], "density": 1.0},
    "breadcrumbs_ties": {"weight": [1.0, 1.0], "density": 1.0, "normalize": True},
    "della": {"weight": [1.0, 1.0], "density": 1.0},
    "della_linear": {"weight": [0.5, 0.5], "density": 1.0},
    "sce": {},
    "model_stock": {},
    "nearswap": {"t": 0.01},
    "passthrough": {},
    "ram": {},
    "ramplus_tl": {},
    "arcee_fusion": {},
}


class TestEveryKernel:
    """Oracles: merging a model with itself returns it; inputs are never modified; the
    result is fp32 for 16-bit inputs and fp64 for fp64 inputs."""

    def test_self_cases_cover_the_registry(self):
        assert set(SELF_CASES) == set(METHODS)

    def call(self, name, x, base, dtype=None):
        spec = METHODS[name]
        n = 1 if spec.max_non_base == 1 else 2
        if dtype is not None:
            x, base = x.to(dtype), base.to(dtype)
        return apply_method(name, [x] * n, base=None if spec.base == "ignored" else base,
                            params=SELF_CASES[name], generator=gen(0))

    @pytest.mark.parametrize("name", list(METHODS))
    def test_self_merge(self, ft, name):
        base, (x, _, _) = ft
        close(self.call(name, x, x if METHODS[name].call == "pair" else base), x)

    @pytest.mark.parametrize("name", list(METHODS))
    def test_inputs_untouched_and_dtypes(self, ft, name):
        base, (x, _, _) = ft
        x2, b2 = x.clone(), base.clone()
        y = x + 0.01 * randn(16, 24, seed=30)
        out = self.call(name, y, base)
        assert torch.equal(base, b2) and torch.equal(x, x2)
        assert out.dtype == torch.float32 and out.shape == x.shape
        assert self.call(name, y, base, torch.bfloat16).dtype == torch.float32
        assert self.call(name, y, base, torch.float64).dtype == torch.float64

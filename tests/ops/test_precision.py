"""recipekit/ops/precision.py: recipekit's fp32 compute dtype and mergekit's own.

Oracles: mergekit 0.1.5's rules (reference/merge-methods.md §3: the compute dtype is the
inputs' promoted dtype; linear and slerp upcast to fp32, fp64 for fp64 inputs) and its
`test_ties_merge` arithmetic recomputed step by step in bf16 here.
"""

from __future__ import annotations

import doctest
import json
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from recipekit.ops import precision
from recipekit.ops.merge import apply_method
from recipekit.ops.precision import compute_dtype, native_dtype, upcast_dtype

from tests.helpers.recipes import ROOT
from tests.helpers.ties import assert_equal_outside_band, call_bands, stable_formula

GOLDEN_INPUTS = ROOT / "tests" / "goldens" / "merge" / "inputs.safetensors"


def test_docstring_examples_run():
    assert doctest.testmod(precision).failed == 0


def test_default_and_native():
    bf, half, f64 = (torch.zeros(2, dtype=d) for d in (torch.bfloat16, torch.float16,
                                                      torch.float64))
    assert compute_dtype(bf, half) == torch.float32
    assert compute_dtype(bf, f64) == torch.float64
    with native_dtype():
        assert compute_dtype(bf) == torch.bfloat16
        assert compute_dtype(bf, half) == torch.float32  # torch's promotion, as mergekit
        assert upcast_dtype(bf) == torch.float32
    assert compute_dtype(bf) == torch.float32


def test_the_flag_is_per_thread():
    seen = []
    with native_dtype():
        t = threading.Thread(target=lambda: seen.append(compute_dtype(torch.zeros(1).bfloat16())))
        t.start()
        t.join()
    assert seen == [torch.float32]


def test_ties_in_bfloat16_is_the_bfloat16_arithmetic():
    """mergekit's TIES in bf16: τ in bf16, top-k on |τ| as fp32, bf16 weights (0.6 → 0.6015625),
    sign election and the disjoint mean in bf16."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, 16, generator=g).bfloat16()
    xs = [(base.float() + 0.1 * torch.randn(8, 16, generator=g)).bfloat16() for _ in range(2)]
    with native_dtype():
        ours = apply_method("ties", xs, base=base, params={"weight": [0.6, 0.4], "density": 0.3})
    assert ours.dtype == torch.bfloat16
    taus = []
    for x in xs:
        tau = x - base
        k = int(0.3 * tau.numel())
        keep = torch.zeros(tau.numel(), dtype=tau.dtype)
        keep[torch.argsort(tau.abs().reshape(-1).float(), descending=True)[:k]] = 1
        taus.append(tau * keep.reshape(tau.shape))
    w = torch.tensor([0.6, 0.4], dtype=torch.bfloat16).reshape(2, 1, 1)
    d = torch.stack(taus) * w
    sign = (d.sum(0) >= 0).to(torch.bfloat16) * 2 - 1
    agree = d.sign() == sign
    div = (w * agree).sum(0)
    div[div == 0] = 1
    assert torch.equal(ours, base + (d * agree).sum(0) / div)


def test_linear_and_slerp_upcast_inside_native():
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randn(4, 8, generator=g).bfloat16() for _ in range(2))
    with native_dtype():
        lin = apply_method("linear", [a, b], params={"weight": [0.3, 0.7]})
        sl = apply_method("slerp", [b], base=a, params={"t": 0.35})
    assert lin.dtype == sl.dtype == torch.float32
    assert torch.equal(lin, apply_method("linear", [a, b], params={"weight": [0.3, 0.7]}))
    assert torch.equal(sl, apply_method("slerp", [b], base=a, params={"t": 0.35}))


BF16 = ROOT / "tests" / "goldens" / "merge_bf16" / "bf16.safetensors"


def bf16_cases() -> list[dict]:
    with safe_open(BF16, "pt") as f:
        return json.loads(f.metadata()["cases"])


def ulps(ours: torch.Tensor, theirs: torch.Tensor) -> int:
    """The largest distance between the two in bf16 steps (both as bf16 bit patterns)."""
    a, b = (t.bfloat16().view(torch.int16).int() for t in (ours, theirs))
    a = torch.where(a < 0, -32768 - a, a)  # sign-magnitude to a monotone integer line
    b = torch.where(b < 0, -32768 - b, b)
    return int((a - b).abs().max()) if a.numel() else 0


#: methods whose bf16 result differs from mergekit's by more than nothing, and why
NOT_EXACT = {
    # mergekit takes karcher's norms in fp32 and its dot products in bf16; recipekit's
    # native mode computes the whole iteration in bf16
    "karcher",
}


def _sce_tie_choices(tensors: list, b: int, params: dict):
    """SCE in bf16 with each choice of the entries whose variance ties at the threshold."""
    import itertools

    from recipekit.ops import task_arithmetic

    base = tensors[b]
    others = [t for i, t in enumerate(tensors) if i != b]
    deltas = torch.stack([t - base for t in others])
    v = torch.var(deltas, dim=0, correction=0).abs().float()
    k = int(torch.count_nonzero(v) * params["select_topk"])
    threshold = torch.sort(v.reshape(-1), descending=True).values[k - 1]
    above = v > threshold
    tied = torch.nonzero((v == threshold).reshape(-1)).reshape(-1).tolist()
    for chosen in itertools.combinations(tied, k - int(above.sum())):
        mask = above.reshape(-1).clone()
        mask[list(chosen)] = True
        fixed = mask.reshape(v.shape).to(deltas.dtype)
        with pytest.MonkeyPatch.context() as mp, native_dtype():
            mp.setattr(task_arithmetic, "sce_topk_mask", lambda d, fraction, m=fixed, **_: m)
            yield apply_method("sce", others, base=base, params=params)


@pytest.mark.parametrize("case", bf16_cases(), ids=lambda c: f"{c['method']}-{c['name']}")
def test_native_bf16_equals_mergekit(case):
    """Oracle: mergekit 0.1.5's `merge_tensors` on the same inputs cast to bf16 (it computes
    in their dtype), tests/goldens/merge_bf16/ (make_merge_goldens.py `write_bf16`).

    Tie rule: bf16 task vectors have few distinct magnitudes, so a TIES/breadcrumbs cut-off
    is often shared across the cut; mergekit's non-stable sort keeps an arbitrary subset of
    those entries, we the lowest flat indices. There the result equals mergekit's bit for bit
    outside the tie band (tests/helpers/ties.py; a minority of positions) and the bf16
    formula with the stable rule's masks everywhere (`stable_formula`)."""
    inputs = {k: v.bfloat16() for k, v in load_file(GOLDEN_INPUTS).items()}
    tensors = [inputs[k] for k in case["inputs"]]
    b = case["base"]
    with native_dtype():
        ours = apply_method(case["method"], [t for i, t in enumerate(tensors) if i != b],
                            base=None if b is None else tensors[b], params=case["params"],
                            generator=torch.Generator().manual_seed(0))
    with safe_open(BF16, "pt") as f:
        theirs = f.get_tensor(f"{case['method']}.{case['name']}")
    others = [t for i, t in enumerate(tensors) if i != b]
    with native_dtype():
        bands = call_bands(case["method"], others, None if b is None else tensors[b],
                           case["params"])
    if case["method"] in NOT_EXACT:
        assert (ours.double() - theirs.double()).abs().max() < 0.1
    elif bands is not None and any(band.any() for band in bands):
        # bf16 task vectors tie at the cut-off: mergekit's arbitrary choice vs the stable rule
        assert ours.dtype == theirs.dtype
        assert_equal_outside_band(ours, theirs, bands, what=case["name"])
        with native_dtype():
            stable = stable_formula(case["method"], others, tensors[b], case["params"])
        assert torch.equal(ours, stable)
    elif case["method"] == "sce" and 0 < case["params"].get("select_topk", 1) < 1:
        # bf16 variances tie at the threshold: mergekit's topk keeps arbitrary ones, recipekit
        # the lowest flat indices (ops/select.py). Oracle: mergekit's bytes are the formula's
        # with some choice of the tied entries (which also moves ω by an ulp)
        assert any(torch.equal(out.to(theirs.dtype), theirs)
                   for out in _sce_tie_choices(tensors, b, case["params"]))
    else:  # mergekit's linear and slerp come back as bf16, ramplus_tl and arcee_fusion fp32
        assert ours.to(theirs.dtype).dtype == theirs.dtype
        assert torch.equal(ours.to(theirs.dtype), theirs), ulps(ours, theirs)

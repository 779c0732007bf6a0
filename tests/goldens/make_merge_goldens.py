"""Write mergekit 0.1.5's own merge outputs on small seeded fp32 inputs to tests/goldens/merge/.

Run it with the side venv (bench/setup_mergekit.sh), not with recipekit's environment:

    bench/.venv-mergekit/bin/python tests/goldens/make_merge_goldens.py [--out DIR] [--only m,...]

Each case calls ``mergekit.merge_methods.merge_tensors`` (the kernel path of mergekit-yaml)
on tensors from `inputs.safetensors`. Random cases seed mergekit's global CPU generator with
``torch.manual_seed(seed)`` right before the call; recipekit reproduces them by drawing from
``torch.Generator().manual_seed(seed)``.

Files written (all small; the whole folder stays well under 300 KB):

* ``inputs.safetensors``: every input tensor, keyed ``<set>.<member>``.
* ``<method>.safetensors``: one output per case, keyed by the case name. The metadata key
  ``cases`` holds a JSON list of ``{"name", "inputs": [keys], "base": index or null,
  "params": {...}, "seed": int or null, "error": null or "ExceptionType: message"}``; a case
  with an error has no output tensor. The key ``versions`` holds mergekit and torch versions.
* ``methods.json``: mergekit's registry for the 17 methods: contract and parameter specs.
* ``random_stats.json``: statistics of mergekit's random sparsifiers on 256×256 tensors
  (not written with ``--only``).
* ``../merge_bf16/bf16.safetensors``: deterministic cases on bf16 inputs, computed by mergekit
  in bf16 (`write_bf16`; not written with ``--only``).

This script imports torch, safetensors and mergekit, and from the checkout only recipekit's
method registry (`recipekit.merge`, plain Python): recipekit is not installed there.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path

import torch
from mergekit import merge_methods, sparsify
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent / "merge"
SHAPE = (16, 24)


def registry_methods() -> tuple[str, ...]:
    """The methods recipekit defines, in registry order: a new method in `recipekit.merge`
    gets goldens (and needs cases below) without a second list here.

    The import is deferred because the registry is read from the checkout (this venv has no
    recipekit installed); `recipekit.merge` imports nothing but the standard library.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from recipekit.merge import METHODS as registry

    return tuple(registry)


METHODS = registry_methods()


def make_inputs() -> dict[str, torch.Tensor]:
    """The input sets, from fixed generator seeds; dyadic where exact deltas matter."""
    g = torch.Generator().manual_seed(20261122)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    def dyadic(x: torch.Tensor, step: float) -> torch.Tensor:
        return torch.round(x / step) * step

    t: dict[str, torch.Tensor] = {}
    for name, shape in (("ft", SHAPE), ("ft1d", (24,)), ("ft3d", (3, 4, 5))):
        base = randn(*shape)
        t[f"{name}.base"] = base
        for i in range(3):
            t[f"{name}.m{i}"] = base + 0.1 * randn(*shape)
    t["pair.a"], t["pair.b"] = randn(*SHAPE), randn(*SHAPE)
    t["near.b"] = t["pair.a"] + 1e-3 * randn(*SHAPE)
    t["anti.b"] = -t["pair.a"]
    t["zero.z"] = torch.zeros(SHAPE)
    t["swap.b"] = t["pair.a"] + 0.02 * randn(*SHAPE)
    # exact task vectors with many tied magnitudes (multiples of 1/32 on a 1/64 grid)
    qbase = dyadic(randn(*SHAPE), 1 / 64)
    t["quant.base"] = qbase
    for i in range(3):
        t[f"quant.m{i}"] = qbase + dyadic(0.1 * randn(*SHAPE), 1 / 32)
    # exactly collinear / opposite task vectors
    d = dyadic(0.1 * randn(*SHAPE), 1 / 32)
    t["line.m0"], t["line.m1"], t["line.m2"] = qbase + d, qbase + 2 * d, qbase - d
    # task vectors too small for sce's absolute energy threshold (uniform weights)
    t["tiny.m0"] = t["ft.base"] + 1e-4 * randn(*SHAPE)
    t["tiny.m1"] = t["ft.base"] + 1e-4 * randn(*SHAPE)
    # a dim-1 length of 1, which DELLA cannot rank
    t["col.base"] = randn(16, 1)
    t["col.m0"] = t["col.base"] + 0.1 * randn(16, 1)
    return {k: v.contiguous() for k, v in t.items()}


FT = ["ft.m0", "ft.m1", "ft.m2"]
FT_B = ["ft.base", *FT]
FT1 = ["ft1d.base", "ft1d.m0", "ft1d.m1", "ft1d.m2"]
FT3 = ["ft3d.base", "ft3d.m0", "ft3d.m1", "ft3d.m2"]
Q_B = ["quant.base", "quant.m0", "quant.m1", "quant.m2"]
W3 = [0.5, 0.3, 0.2]


def c(name: str, inputs: list[str], base: int | None = None, seed: int | None = None,
      **params: object) -> dict:
    return {"name": name, "inputs": inputs, "base": base, "params": params, "seed": seed}


def cases() -> dict[str, list[dict]]:
    """Method → cases. Per-non-base parameters are lists in non-base order."""
    gta_common = [
        c("1d", FT1, 0, weight=W3, density=0.5),
        c("3d", FT3, 0, weight=W3, density=0.5),
        c("base_only", ["ft.base"], 0, weight=[]),
    ]
    out: dict[str, list[dict]] = {
        "linear": [
            c("norm", FT, weight=W3),
            c("nonorm_neg", FT_B, weight=[1.0, -0.5, 0.25, 0.7], normalize=False),
            c("1d", FT1[1:], weight=[2.0, 1.0, 1.0]),
            c("3d", FT3[1:], weight=W3),
            c("single", ["ft.m0"], weight=[0.7]),
            c("zero_sum", ["ft.m0", "ft.m1"], weight=[1.0, -1.0]),
        ],
        "slerp": [
            *(c(f"t{t}", ["pair.a", "pair.b"], 0, t=t) for t in (0.0, 0.3, 0.7, 1.0, -0.25, 1.5)),
            c("near", ["pair.a", "near.b"], 0, t=0.4),
            c("antiparallel", ["pair.a", "anti.b"], 0, t=0.3),
            c("zero_base", ["zero.z", "pair.a"], 0, t=0.5),
            c("zero_both", ["zero.z", "zero.z"], 0, t=0.5),
            c("base_second", ["pair.b", "pair.a"], 1, t=0.3),
            c("1d", ["ft1d.base", "ft1d.m0"], 0, t=0.6),
            c("3d", ["ft3d.base", "ft3d.m0"], 0, t=0.6),
            c("self", ["pair.a", "pair.a"], 0, t=0.3),
        ],
        "nuslerp": [
            *(c(f"{tag}_{'base' if b is not None else 'nobase'}", ins, b, weight=[0.3, 0.7],
                nuslerp_flatten=fl, nuslerp_row_wise=rw)
              for tag, fl, rw in (("flat", True, False), ("rows", False, False),
                                  ("cols", False, True))
              for ins, b in ((["ft.base", "ft.m0", "ft.m1"], 0), (["ft.m0", "ft.m1"], None))),
            c("extrapolate", ["ft.base", "ft.m0", "ft.m1"], 0, weight=[1.0, -0.4]),
            c("zero_sum", ["ft.base", "ft.m0", "ft.m1"], 0, weight=[1.0, -1.0]),
            c("collinear", ["quant.base", "line.m0", "line.m1"], 0, weight=[0.5, 0.5]),
            c("zero_delta", ["ft.base", "ft.base", "ft.m1"], 0, weight=[0.4, 0.6]),
            c("1d_rows", FT1[:3], 0, weight=[0.3, 0.7], nuslerp_flatten=False),
            c("3d_cols", FT3[:3], 0, weight=[0.3, 0.7], nuslerp_flatten=False,
              nuslerp_row_wise=True),
            c("3d_rows", FT3[:3], 0, weight=[0.3, 0.7], nuslerp_flatten=False),
        ],
        "multislerp": [
            c("nobase", FT, weight=W3),
            c("base", FT_B, 0, weight=W3),
            c("unnormalized", FT_B, 0, weight=[1.0, 0.5, 0.25], normalize_weights=False),
            c("two", ["ft.base", "ft.m0", "ft.m1"], 0, weight=[0.4, 0.6]),
            c("one", ["ft.base", "ft.m0"], 0, weight=[0.4]),
            c("1d", FT1, 0, weight=W3),
            c("antipodal_two", ["pair.a", "anti.b"], weight=[0.5, 0.5]),
            c("antipodal_three", ["quant.base", "line.m0", "line.m2", "line.m0"], 0,
              weight=[0.25, 0.5, 0.25]),
        ],
        "karcher": [
            c("three", FT),
            c("four", FT_B),
            c("two", ["pair.a", "pair.b"]),
            c("with_zero", ["zero.z", "pair.a", "pair.b"]),
            c("all_zero", ["zero.z", "zero.z"]),
            c("one_iter", FT, max_iter=1),
            c("loose_tol", ["pair.a", "pair.b"], tol=1e-2),
            c("1d", FT1[1:]),
            c("single", ["ft.m0"]),
            c("self", ["pair.a", "pair.a"]),
        ],
        "task_arithmetic": [
            c("basic", FT_B, 0, weight=W3),
            c("normalize_lambda", FT_B, 0, weight=W3, normalize=True, **{"lambda": 0.8}),
            c("negative_normalized", ["ft.base", "ft.m0"], 0, weight=[-1.0], normalize=True),
            c("negative", ["ft.base", "ft.m0"], 0, weight=[-1.0]),
            c("zero_weights", FT_B, 0, weight=[1.0, -1.0, 0.0], normalize=True),
            *gta_common,
        ],
        "ties": [
            c("d05", FT_B, 0, weight=[1.0, 1.0, 1.0], density=0.5),
            c("mixed", FT_B, 0, weight=W3, density=[0.3, 0.5, 0.9]),
            c("rescale_int8_nonorm", FT_B, 0, weight=W3, density=0.5, rescale=True,
              int8_mask=True, normalize=False),
            c("negative", FT_B, 0, weight=[0.6, -0.4, 0.5], density=0.6),
            c("d1", FT_B, 0, weight=W3, density=1.0),
            c("d0", FT_B, 0, weight=W3, density=0.0),
            c("k1", FT_B, 0, weight=W3, density=0.001),
            c("ties_quant", Q_B, 0, weight=W3, density=0.5),
            c("lambda", FT_B, 0, weight=W3, density=0.7, **{"lambda": 0.5}),
            *gta_common,
        ],
        "breadcrumbs": [
            c("d08_g005", FT_B, 0, weight=W3, density=0.8, gamma=0.05),
            c("clipped", FT_B, 0, weight=W3, density=0.9, gamma=0.2),
            c("no_top", FT_B, 0, weight=W3, density=0.5, gamma=0.001),
            c("rescale", FT_B, 0, weight=W3, density=0.6, gamma=0.1, rescale=True),
            c("d0", FT_B, 0, weight=W3, density=0.0),
            c("d1", FT_B, 0, weight=W3, density=1.0, gamma=0.3),
            c("quant", Q_B, 0, weight=W3, density=0.5, gamma=0.1),
            *gta_common,
        ],
        "breadcrumbs_ties": [
            c("d09_g02", FT_B, 0, weight=W3, density=0.9, gamma=0.2),
            c("normalize", FT_B, 0, weight=W3, density=[0.7, 0.6, 0.5], gamma=0.1,
              normalize=True),
            *gta_common,
        ],
        "sce": [
            c("all", FT_B, 0),
            c("topk03", FT_B, 0, select_topk=0.3),
            c("topk0", FT_B, 0, select_topk=0.0),
            c("int8", FT_B, 0, select_topk=0.5, int8_mask=True),
            c("tiny_uniform", ["ft.base", "tiny.m0", "tiny.m1"], 0),
            c("one", ["ft.base", "ft.m0"], 0),
            c("1d", FT1, 0, select_topk=0.5),
            c("3d", FT3, 0, select_topk=0.5),
            c("base_only", ["ft.base"], 0),
        ],
        "model_stock": [
            c("flat", FT_B, 0),
            c("filter_wise", FT_B, 0, filter_wise=True),
            c("two", ["ft.base", "ft.m0", "ft.m1"], 0),
            c("1d", FT1, 0),
            c("1d_filter_wise", FT1, 0, filter_wise=True),
            c("3d_filter_wise", FT3, 0, filter_wise=True),
            c("singular", ["quant.base", "line.m0", "line.m2"], 0),
            c("negative_cos", ["quant.base", "line.m0", "line.m2", "line.m1"], 0),
        ],
        "nearswap": [
            c("t001", ["pair.a", "swap.b"], 0, t=0.01),
            c("t01", ["pair.a", "swap.b"], 0, t=0.1),
            c("far", ["pair.a", "pair.b"], 0, t=0.05),
            c("1d", ["ft1d.base", "ft1d.m0"], 0, t=0.05),
        ],
        "passthrough": [
            c("scale", ["ft.m0"], scale=[0.5]),
            c("none", ["ft.m0"]),
            c("1d", ["ft1d.m0"], scale=[-2.0]),
        ],
        "ram": [
            c("default", FT_B, 0),
            c("eps005", FT_B, 0, epsilon=0.05),
            c("quant", Q_B, 0, epsilon=0.04),
            c("collinear", ["quant.base", "line.m0", "line.m1", "line.m2"], 0),
            c("one", ["ft.base", "ft.m0"], 0, epsilon=0.1),
            c("1d", FT1, 0, epsilon=0.05),
            c("3d", FT3, 0, epsilon=0.1),
            c("base_only", ["ft.base"], 0),
        ],
        "ramplus_tl": [
            c("default", FT_B, 0),
            c("eps005", FT_B, 0, epsilon=0.05),
            c("r_alpha", FT_B, 0, r=0.5, alpha=1.0, epsilon=0.1),
            c("quant", Q_B, 0, epsilon=0.04),
            c("collinear", ["quant.base", "line.m0", "line.m1", "line.m2"], 0, r=0.3),
            c("one", ["ft.base", "ft.m0"], 0, epsilon=0.1),
            c("1d", FT1, 0, epsilon=0.05),
            c("3d", FT3, 0, epsilon=0.1, alpha=0.5),
            c("base_only", ["ft.base"], 0),
        ],
        "arcee_fusion": [
            c("ft", ["ft.base", "ft.m0"], 0),
            c("pair", ["pair.a", "pair.b"], 0),
            c("near", ["pair.a", "swap.b"], 0),
            c("base_second", ["ft.m1", "ft.base"], 1),
            c("quant", ["quant.base", "quant.m0"], 0),
            c("1d", ["ft1d.base", "ft1d.m0"], 0),
            c("3d", ["ft3d.base", "ft3d.m0"], 0),
            c("self", ["pair.a", "pair.a"], 0),
        ],
    }
    random = {
        "dare_linear": [
            c("d03", FT_B, 0, 1, weight=W3, density=0.3),
            c("no_rescale", FT_B, 0, 2, weight=W3, density=0.5, rescale=False),
            c("mixed", FT_B, 0, 3, weight=W3, density=[0.2, 0.5, 1.0], normalize=True),
            c("1d", FT1, 0, 4, weight=W3, density=0.5),
        ],
        "dare_ties": [
            c("d03", FT_B, 0, 1, weight=W3, density=0.3),
            c("normalize", FT_B, 0, 5, weight=[1.0, 1.0, 1.0], density=0.5, normalize=True),
            c("d0", FT_B, 0, 6, weight=W3, density=0.0),
            c("3d", FT3, 0, 7, weight=W3, density=0.6),
        ],
        "della": [
            c("d05", FT_B, 0, 1, weight=W3, density=0.5),
            c("d04_e01", FT_B, 0, 2, weight=W3, density=0.4, epsilon=0.1),
            c("no_rescale", FT_B, 0, 3, weight=W3, density=0.5, rescale=False),
            c("1d", FT1, 0, 4, weight=W3, density=0.5),
            c("3d", FT3, 0, 5, weight=W3, density=0.5, epsilon=0.2),
            c("bad_epsilon", FT_B, 0, 6, weight=W3, density=0.1),
            c("length_one", ["col.base", "col.m0"], 0, 7, weight=[1.0], density=0.5),
        ],
        "della_linear": [
            c("d05", FT_B, 0, 1, weight=W3, density=0.5),
            c("mixed", FT_B, 0, 2, weight=W3, density=[0.3, 0.5, 0.7], epsilon=[0.1, 0.2, 0.25]),
        ],
    }
    out.update(random)
    return {m: out[m] for m in METHODS}


def run_case(case: dict, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    tensors = [inputs[k].clone() for k in case["inputs"]]
    if case["seed"] is not None:
        torch.manual_seed(case["seed"])
    return merge_methods.merge_tensors(tensors, case["method"], parameters=case["params"],
                                       base_index=case["base"])


def method_specs() -> dict:
    """mergekit's registry for the methods in scope, as plain JSON."""
    specs = {}
    for m in merge_methods.registered_methods():
        s = m.spec
        if s.name not in METHODS:
            continue
        params = []
        for p in s.parameters:
            nullable = p.value_type not in (float, bool, int)
            type_name = "float" if nullable else p.value_type.__name__
            params.append({"name": p.name, "type": type_name, "nullable": nullable,
                           "scope": p.scope.value, "required": p.required,
                           "default": None if p.required else p.default})
        k = s.contract
        specs[s.name] = {
            "base": k.base.value, "min_inputs": k.min_inputs, "max_inputs": k.max_inputs,
            "min_non_base": k.min_non_base, "max_non_base": k.max_non_base,
            "optional_tensor_policy": m.optional_tensor_policy.value
            if hasattr(m, "optional_tensor_policy") else s.optional_tensor_policy.value,
            "params": params,
        }
    return {name: specs[name] for name in METHODS}


def random_stats() -> dict:
    """Kept fractions and rescale factors of mergekit's sparsifiers on 256×256 fp32 deltas."""
    tau = torch.randn(256, 256, generator=torch.Generator().manual_seed(7))
    out: dict = {"shape": [256, 256], "tau": "torch.randn(256, 256) from Generator seed 7",
                 "bernoulli": [], "della": []}
    for density in (0.1, 0.3, 0.5, 0.9):
        for seed in (0, 1):
            torch.manual_seed(seed)
            kept = sparsify.bernoulli(tau, density, sparsify.RescaleNorm.l1)
            mask = kept != 0
            factor = (kept[mask] / tau[mask]).mean().item()
            out["bernoulli"].append({
                "density": density, "seed": seed, "kept": mask.float().mean().item(),
                "rescale_factor": factor,
                "l1_ratio": (tau.abs().sum() / tau[mask].abs().sum()).item()})
    ranks = tau.abs().argsort(dim=1).argsort(dim=1)
    for density, epsilon in ((0.4, 0.1), (0.5, 0.15), (0.3, 0.25)):
        for seed in (0, 1):
            torch.manual_seed(seed)
            mask = sparsify.della_magprune(tau, density, epsilon, None) != 0
            low = mask[ranks < 26].float().mean().item()
            high = mask[ranks >= 230].float().mean().item()
            out["della"].append({"density": density, "epsilon": epsilon, "seed": seed,
                                 "kept": mask.float().mean().item(),
                                 "kept_bottom_decile": low, "kept_top_decile": high})
    return out


def write_bf16(inputs: dict[str, torch.Tensor], out: Path, versions: str) -> None:
    """``merge_bf16/bf16.safetensors``: the first three cases of every method that draws
    nothing, on the inputs cast to bf16, so mergekit computes in bf16 (its compute dtype is
    the inputs' promoted dtype); keyed ``<method>.<case>``, cases in the metadata as above."""
    outputs, meta = {}, []
    for method, method_cases in cases().items():
        if method in ("dare_linear", "dare_ties", "della", "della_linear"):
            continue
        for case in method_cases[:3]:
            bf = {k: v.bfloat16() for k, v in inputs.items()}
            try:
                outputs[f"{method}.{case['name']}"] = run_case(
                    {**case, "method": method}, bf).contiguous()
            except Exception:  # noqa: BLE001, S112 - a case mergekit refuses has no golden
                continue
            meta.append({**case, "method": method})
    out.mkdir(parents=True, exist_ok=True)
    save_file(outputs, out / "bf16.safetensors",
              metadata={"cases": json.dumps(meta), "versions": versions})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--only", default="", help="comma-separated methods (default: all)")
    args = parser.parse_args()
    only = [m for m in args.only.split(",") if m] or list(METHODS)
    args.out.mkdir(parents=True, exist_ok=True)
    versions = json.dumps({"mergekit": importlib.metadata.version("mergekit"),
                           "torch": torch.__version__})

    inputs = make_inputs()
    save_file(inputs, args.out / "inputs.safetensors", metadata={"versions": versions})
    for method, method_cases in cases().items():
        if method not in only:
            continue
        outputs, meta = {}, []
        for case in method_cases:
            case = {**case, "method": method}
            try:
                outputs[case["name"]] = run_case(case, inputs).contiguous()
                case["error"] = None
            except Exception as e:  # noqa: BLE001 - the error is the golden
                case["error"] = f"{type(e).__name__}: {e}"
            del case["method"]
            meta.append(case)
        save_file(outputs, args.out / f"{method}.safetensors",
                  metadata={"cases": json.dumps(meta), "versions": versions})
    (args.out / "methods.json").write_text(json.dumps(method_specs(), indent=1) + "\n")
    if not args.only:
        write_bf16(inputs, args.out.parent / "merge_bf16", versions)
        (args.out / "random_stats.json").write_text(
            json.dumps(random_stats(), indent=1) + "\n")


if __name__ == "__main__":
    main()

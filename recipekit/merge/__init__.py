"""The merge methods' contracts as data: parameters, defaults, base policy, input counts.

mergekit 0.1.5's registry (reference/merge-methods.md), checked against its own dump in
tests/goldens/merge/methods.json. It lives apart from the kernels (`recipekit.ops.merge`) so that
validating and planning a recipe never imports torch (about a second of start-up); `kernel`
names the function in `recipekit.ops.merge.KERNELS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParamSpec:
    """One method parameter as mergekit 0.1.5 declares it.

    `name` is mergekit's (and the recipe's) key; `kwarg` the kernel's keyword. `scope` is
    "shared" (one value per tensor), "per_input" (one per input, base included) or
    "per_non_base" (one per non-base input; a value given to the base is ignored). `type` is
    "float", "bool" or "int"; `nullable` allows null (passthrough's scale). A `required`
    parameter has no default. `note` says when a parameter is accepted but has no effect.
    """

    name: str
    type: str
    scope: str
    default: Any = None
    required: bool = False
    kwarg: str = ""
    nullable: bool = False
    note: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """One merge method: its kernel and its contract, as data.

    `base` is "required", "optional" or "ignored" (a configured base becomes an ordinary
    input). Input counts include the base when present: `min_inputs` … `max_inputs` (None:
    unbounded), and `min_non_base` … `max_non_base` for the non-base ones. `call` says how
    `apply_method` passes tensors to `kernel`: "inputs" kernel(inputs), "pair" kernel(base,
    other), "pair_weights" (nuslerp) kernel(a, b, weight_a=, weight_b=, base=), "base_inputs"
    kernel(base, inputs), "single" kernel(x). `random` kernels take a generator.
    `elementwise` says that output element i depends only on element i of the inputs, so
    the executor may compute the tensor in chunks with a bit-identical result (DESIGN.md §1).
    `missing_tensor` is what mergekit does when an optional tensor is absent from some
    inputs: "merge_present" (merge the inputs that have it; the base must be one),
    "copy_single" (copy a lone present input), "copy_base_single" (copy it only if it is the
    base), "base_or_skip" (copy a lone base, otherwise skip the tensor).
    """

    name: str
    kernel: str
    base: str
    min_inputs: int
    max_inputs: int | None
    min_non_base: int
    max_non_base: int | None
    params: tuple[ParamSpec, ...]
    call: str
    random: bool = False
    missing_tensor: str = "merge_present"
    paper: str = ""
    elementwise: bool = False
    fixed: tuple[tuple[str, Any], ...] = ()
    summary: str = ""
    #: the whole-tensor kernel's scratch, in fp32 copies of the tensor: (fixed, per non-base
    #: input), measured (tests/run/test_execute_estimates.py); the plan's estimate adds it
    scratch: tuple[int, int] = (2, 0)

    @property
    def pair(self) -> bool:
        """A two-model method: the recipe writes `from: [A, B]` with t = 0 giving A and no
        `base:` (DESIGN.md §2), and the kernel is called kernel(A, B). The merge step and
        import-mergekit both ask this, so a new pair method needs no list of names."""
        return self.call == "pair"

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    @property
    def defaults(self) -> dict[str, Any]:
        """mergekit key → default, for the parameters that have one."""
        return {p.name: p.default for p in self.params if not p.required}

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if p.required)

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


def _p(name: str, type_: str, scope: str, default: Any = None, *, required: bool = False,
       kwarg: str = "", nullable: bool = False, note: str = "") -> ParamSpec:
    return ParamSpec(name, type_, scope, default, required, kwarg or name, nullable, note)


def _gta(name: str, summary: str, *, sparsify: str | None, consensus: str | None,
         normalize: bool, rescale: bool, extra: tuple[ParamSpec, ...] = (),
         random: bool = False, paper: str = "", unused_density: bool = False,
         elementwise: bool = False) -> MethodSpec:
    """A task-arithmetic method: `ops.task_arithmetic.generalized_task_arithmetic` with this
    sparsifier and sign consensus, and these defaults."""
    no_effect = "accepted for mergekit compatibility; no effect"
    params = (
        _p("weight", "float", "per_non_base", required=True, kwarg="weights"),
        _p("density", "float", "per_non_base", 1.0, kwarg="densities",
           note=no_effect if unused_density else ""),
        *extra,
        _p("lambda", "float", "shared", 1.0, kwarg="lambda_"),
        _p("normalize", "bool", "shared", normalize),
        _p("rescale", "bool", "shared", rescale, note=no_effect if unused_density else ""),
        _p("int8_mask", "bool", "shared", False, note="memory only; no numerical effect"),
    )
    fixed = tuple((k, v) for k, v in (("sparsify", sparsify), ("consensus", consensus)) if v)
    return MethodSpec(name, name, "required", 1, None, 0, None, params, "base_inputs",
                      random=random, paper=paper, elementwise=elementwise, fixed=fixed,
                      summary=summary, scratch=(10, 4))


_GAMMA = (_p("gamma", "float", "per_non_base", 0.01),)
_EPSILON = (_p("epsilon", "float", "per_non_base", 0.15),)
_WEIGHT_NB = _p("weight", "float", "per_non_base", required=True, kwarg="weights")

#: name → MethodSpec, in the order of reference/merge-methods.md §1
METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("linear", "linear", "ignored", 1, None, 1, None, (
        _p("weight", "float", "per_input", required=True, kwarg="weights"),
        _p("normalize", "bool", "shared", True),
    ), "inputs", paper="https://arxiv.org/abs/2203.05482", elementwise=True),
    MethodSpec("slerp", "slerp", "required", 2, 2, 1, 1, (
        _p("t", "float", "shared", required=True),
    ), "pair", missing_tensor="copy_single"),
    MethodSpec("nuslerp", "nuslerp", "optional", 2, 3, 2, 2, (
        _WEIGHT_NB,
        _p("nuslerp_flatten", "bool", "shared", True, kwarg="flatten"),
        _p("nuslerp_row_wise", "bool", "shared", False, kwarg="row_wise"),
    ), "pair_weights", missing_tensor="copy_single", scratch=(8, 0)),
    MethodSpec("multislerp", "multislerp", "optional", 1, None, 1, None, (
        _WEIGHT_NB,
        _p("normalize_weights", "bool", "shared", True),
        _p("eps", "float", "shared", 1e-8),
    ), "inputs", paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        scratch=(7, 3)),
    MethodSpec("karcher", "karcher", "ignored", 1, None, 1, None, (
        _p("max_iter", "int", "shared", 10),
        _p("tol", "float", "shared", 1e-5),
    ), "inputs", paper="https://arxiv.org/abs/2603.04972", scratch=(8, 4)),
    _gta("task_arithmetic", "Task arithmetic: θ_b + λ·Σ w_i τ_i (÷ Σw if `normalize`)",
         sparsify=None, consensus=None, normalize=False, rescale=False,
         unused_density=True, elementwise=True, paper="https://arxiv.org/abs/2212.04089"),
    _gta("ties", "TIES: magnitude top-k per model, sign election, disjoint mean",
         sparsify="magnitude", consensus="sum", normalize=True, rescale=False,
         paper="https://arxiv.org/abs/2306.01708"),
    _gta("dare_linear", "DARE without sign consensus: Bernoulli(d) drop per model, L1 rescale",
         sparsify="random", consensus=None, normalize=False, rescale=True, random=True,
         paper="https://arxiv.org/abs/2311.03099"),
    _gta("dare_ties", "DARE with TIES sign consensus",
         sparsify="random", consensus="sum", normalize=False, rescale=True, random=True,
         paper="https://arxiv.org/abs/2311.03099"),
    _gta("breadcrumbs", "Model breadcrumbs: drop small entries and the γ largest outliers per "
         "model, then sum", sparsify="magnitude_outliers", consensus=None, normalize=False,
         rescale=False, extra=_GAMMA, paper="https://arxiv.org/abs/2312.06795"),
    _gta("breadcrumbs_ties", "Breadcrumbs pruning with TIES sign consensus",
         sparsify="magnitude_outliers", consensus="sum", normalize=False, rescale=False,
         extra=_GAMMA, paper="https://arxiv.org/abs/2312.06795"),
    _gta("della", "DELLA: rank-dependent random drop (MAGPRUNE), sign consensus",
         sparsify="della_magprune", consensus="sum", normalize=True, rescale=True,
         extra=_EPSILON, random=True, paper="https://arxiv.org/abs/2406.11617"),
    _gta("della_linear", "DELLA without sign consensus",
         sparsify="della_magprune", consensus=None, normalize=False, rescale=True,
         extra=_EPSILON, random=True, paper="https://arxiv.org/abs/2406.11617"),
    MethodSpec("sce", "sce", "required", 1, None, 0, None, (
        _p("select_topk", "float", "shared", 1.0),
        _p("int8_mask", "bool", "shared", False, note="memory only; no numerical effect"),
    ), "base_inputs", paper="https://arxiv.org/abs/2408.07990", scratch=(8, 3)),
    MethodSpec("model_stock", "model_stock", "required", 3, None, 2, None, (
        _p("filter_wise", "bool", "shared", False),
    ), "base_inputs", missing_tensor="base_or_skip", paper="https://arxiv.org/abs/2403.19522",
        scratch=(5, 2)),
    MethodSpec("nearswap", "nearswap", "required", 2, 2, 1, 1, (
        _p("t", "float", "shared", required=True),
    ), "pair", missing_tensor="copy_base_single", elementwise=True),
    MethodSpec("passthrough", "passthrough", "ignored", 1, 1, 1, 1, (
        _p("scale", "float", "per_input", None, nullable=True),
    ), "single", elementwise=True),
    MethodSpec("ram", "ram", "required", 1, None, 0, None, (
        _p("epsilon", "float", "shared", 1e-5),
    ), "base_inputs", paper="https://arxiv.org/abs/2601.13572", elementwise=True,
        scratch=(8, 4),  # measured 13, 17, 17, 25 fp32 copies above 1-4 bf16 inputs and a base
        summary="RAM: a delta one model alone makes is kept, deltas several share are averaged"),
    MethodSpec("ramplus_tl", "ramplus_tl", "required", 1, None, 0, None, (
        _p("r", "float", "shared", 0.1),
        _p("alpha", "float", "shared", 0.2),
        _p("epsilon", "float", "shared", 1e-5),
    ), "base_inputs", paper="https://arxiv.org/abs/2601.13572", scratch=(12, 4),
        summary="RAM+ (tensor-local): RAM with lone deltas scaled by 1 + r·clamp(ρ, 0, α)"),
    MethodSpec("arcee_fusion", "arcee_fusion", "required", 2, 2, 1, 1, (), "pair",
               random=True, missing_tensor="copy_single", paper="https://arcee.ai",
               scratch=(12, 0),
               summary="Arcee Fusion: the other model's value where its importance is an "
               "upper outlier (median + 1.5·IQR); random only above 10^6 elements"),
)}


def resolve_params(spec: MethodSpec, params: Mapping[str, Any],
                   n_inputs: int) -> dict[str, Any]:
    """Kernel keyword arguments from mergekit-keyed values, defaults filled in, per-input
    values expanded to ``n_inputs``.

    Raises:
        ValueError: an unknown or missing required parameter, or a wrong value count.
    """
    unknown = sorted(set(params) - {p.name for p in spec.params})
    if unknown:
        raise ValueError(f"{spec.name}: unknown parameter(s) {', '.join(unknown)}; "
                         f"expected {', '.join(p.name for p in spec.params)}")
    kwargs: dict[str, Any] = {}
    for p in spec.params:
        if p.name in params:
            value = params[p.name]
        elif p.required:
            raise ValueError(f"{spec.name}: missing required parameter {p.name}")
        else:
            value = p.default
        if p.scope != "shared":
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                value = [value] * n_inputs
            elif len(value) != n_inputs:
                raise ValueError(f"{spec.name}: parameter {p.name} needs {n_inputs} value(s), "
                                 f"one per {p.scope.replace('_', '-')} input, got {len(value)}")
            value = list(value)
        kwargs[p.kwarg] = value
    return kwargs


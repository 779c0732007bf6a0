"""The `merge` op: one of mergekit 0.1.5's merge methods, tensor by tensor.

``from:`` lists the inputs (names, or ``{model: m, weight: w, density: d, ...}`` carrying
per-input parameters), ``base:`` the base for methods that need one (never also in ``from``),
``parameters:`` method-wide values (a per-input parameter given here applies to every input),
``seed:`` the seed of random methods, ``compute_dtype:`` the dtype to compute in as mergekit
does (`float32`, `bfloat16`, `float16`, `float64`, or `inputs`: their promoted dtype, mergekit's
default; absent, recipekit's fp32 and one rounding; `ops.precision`). Two-model methods (slerp,
nearswap, arcee_fusion) take ``from: [A, B]`` with t = 0 giving A, and no ``base:``. Every
numeric parameter may be a number, a gradient or rules (params.py), resolved per output tensor.
Methods, scopes and defaults come from `recipekit.merge.METHODS` (mergekit 0.1.5's contract,
reference/merge-methods.md).
Oracle: tests/steps/test_merge.py runs recipes and compares with the kernels on the loaded
tensors and with mergekit goldens.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from recipekit.dtypes import NAME_TO_CODE, is_floating, promote, torch_dtype
from recipekit.errors import KeyPath, RecipeError, RecipeErrors, printable
from recipekit.graph import (
    Node,
    SameShape,
    VirtualModel,
    cast,
    fp32_copies,
    intern,
)
from recipekit.graph.passes import Reduction
from recipekit.io.header import quote_name
from recipekit.merge import METHODS, resolve_params
from recipekit.recipe import Recipe, Step
from recipekit.recipe.params import (
    ParamError,
    is_constant,
    resolve,
    warn_unmatched_rules,
)
from recipekit.steps.gram import is_row_local, streamed_gram
from recipekit.steps.interpolate import check_aligned
from recipekit.steps.registry import Op
from recipekit.steps.stream_merges import streamed_merge
from recipekit.steps.tied import untied_config, with_stand_in_heads
from recipekit.steps.vocab import align_inputs, check_tokenizer, vocab_config

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Merge(SameShape):
    """One output tensor of a merge method (ops/merge.py), rounded once to ``dtype``.

    ``params`` holds the values resolved for this tensor (shared: a number or bool; per-input:
    a tuple aligned with ``operands``). ``tensor`` names the output tensor for random methods,
    whose generator is seeded by (``seed``, ``tensor``); it is empty for deterministic ones so
    that equal merges of equal inputs stay one node.
    """

    rounds_once: ClassVar[bool] = True

    method: str
    operands: tuple[Node, ...]
    base: Node | None
    params: tuple[tuple[str, Any], ...]
    seed: int
    tensor: str
    dtype: str
    #: the step's `compute_dtype:` is set: the operands are already cast to ``dtype`` and the
    #: kernel computes in it as mergekit does (`ops.precision.native_dtype`)
    native: bool = False

    @property
    def shape_input(self) -> Node:
        """The input whose shape this node has."""
        return self.operands[0]

    @property
    def inputs(self) -> tuple[Node, ...]:
        return self.operands + ((self.base,) if self.base is not None else ())

    @property
    def workspace(self) -> int:
        # fp32 copies of narrower inputs, then the kernel's own scratch (`MethodSpec.scratch`:
        # deltas, normalized copies, sort indices, the fp32 result; measured per method)
        fixed, per_input = METHODS[self.method].scratch
        scratch = fixed + per_input * len(self.operands)
        return fp32_copies(self.inputs) + scratch * 4 * self.numel

    @property
    def elementwise(self) -> bool:
        return METHODS[self.method].elementwise

    @property
    def row_block(self) -> int:  # type: ignore[override]
        # a vector is one row: its whole kernel runs on one piece, the whole vector, as a
        # row-local kernel runs on a matrix's rows (the plan's estimate holds it whole)
        return self.shape[0] if len(self.shape) == 1 and not self.elementwise else 1

    def row_inputs(self) -> tuple[bool, ...] | None:
        # row-local methods (steps/gram.py) compute any rows from those rows of every input
        if self.elementwise or len(self.shape) == 1 or is_row_local(
                self.method, dict(self.params), len(self.shape)):
            return (True,) * len(self.inputs)
        return None

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.ops.merge import apply_method
        from recipekit.ops.rng import tensor_generator

        n = len(self.operands)
        base = args[n] if self.base is not None else None
        generator = tensor_generator(self.seed, self.tensor) if self.tensor else None
        if not self.native:
            return apply_method(self.method, list(args[:n]), base=base,
                                params=dict(self.params),
                                generator=generator).to(torch_dtype(self.dtype))
        from recipekit.ops.precision import native_dtype

        with native_dtype():
            out = apply_method(self.method, list(args[:n]), base=base, params=dict(self.params),
                               generator=generator)
        return out.to(torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class SlerpCoefficients(Reduction):
    """slerp's two coefficients for one pair of tensors (ops/merge.py `slerp_coefficients`):
    two passes over row pieces of a and b (chunk norms, then chunk dots), the result two
    numbers. Pieces start on mergekit's 2^20-value chunk boundaries, so every chunk is reduced
    as the whole-tensor kernel reduces it: the same bytes, whole or streamed."""

    a: Node
    b: Node
    t: float

    passes: ClassVar[int] = 2
    #: the largest piece (in values) kept aligned to the chunks; a row length whose alignment
    #: needs more reads the tensor as one piece
    MAX_ALIGNED: ClassVar[int] = 16 << 20

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (2,)

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return "F64" if "F64" in (self.a.dtype, self.b.dtype) else "F32"

    @property
    def state_bytes(self) -> int:
        # two reused chunk buffers of the compute dtype (`ops.merge._chunk_buffer`)
        return 2 * 8 * self.CHUNK

    #: mergekit's chunk (`ops.merge.SLERP_CHUNK`; planning imports no torch)
    CHUNK: ClassVar[int] = 1 << 20

    def bounds(self) -> list[tuple[int, int]]:
        rows, row = self.stream_rows, max(1, self.stream_row_elems)
        per = math.lcm(row, self.CHUNK) // row
        if per * row > self.MAX_ALIGNED:
            return [(0, rows)]
        per *= max(1, (4 * self.CHUNK) // (per * row))  # ~4 chunks a piece: fewer buffers
        return [(lo, min(lo + per, rows)) for lo in range(0, rows, per)]

    def reduce(self, source: Any, whole: tuple[Any, ...]) -> Any:
        from recipekit.ops.merge import (
            slerp_chunk_dots,
            slerp_chunk_norms,
            slerp_finish,
            slerp_norm,
        )

        dtype = torch_dtype(self.dtype)
        norms_a: list[Any] = []
        norms_b: list[Any] = []
        for pa, pb in source.map(lambda lo, hi, p: (
                slerp_chunk_norms(p[0].reshape(-1), dtype),
                slerp_chunk_norms(p[1].reshape(-1), dtype))):
            norms_a += pa
            norms_b += pb
        na, nb = slerp_norm(norms_a, 1e-8), slerp_norm(norms_b, 1e-8)
        dots: list[Any] = []
        for part in source.map(lambda lo, hi, p: slerp_chunk_dots(
                p[0].reshape(-1), p[1].reshape(-1), na.to(p[0].device), nb.to(p[0].device),
                dtype)):
            dots += part
        device = na.device
        return slerp_finish([d.to(device) for d in dots], self.t, dtype, device)


@dataclass(frozen=True, eq=False)
class Slerp(SameShape):
    """One output tensor of `slerp`: c_a·a + c_b·b (ops/merge.py `slerp_apply`), rounded once
    to ``dtype``. Elementwise in a and b once the coefficients are known, so large tensors run
    in row pieces sliced from the a and b the coefficients read (execute.evaluate_chunks)
    instead of fp32 copies with an fp32 result. The bytes are those of `slerp` on the whole
    tensors (tests/steps/test_merge.py, tests/test_execute.py::TestChunkedEvaluation)."""

    rounds_once: ClassVar[bool] = True

    a: Node
    b: Node
    coefficients: SlerpCoefficients
    dtype: str
    #: the step's `compute_dtype:` is set: the fp32 result is rounded to ``dtype`` (the compute
    #: dtype) before any output cast, as mergekit does (`graph.nodes.round_to`)
    native: bool = False

    method: ClassVar[str] = "slerp"

    @property
    def shape_input(self) -> Node:
        """The input whose shape this node has."""
        return self.a

    @property
    def workspace(self) -> int:
        return fp32_copies((self.a, self.b)) + 4 * self.numel

    def row_inputs(self) -> tuple[bool, ...] | None:
        return (True, True, False)

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.ops.merge import slerp_apply

        return slerp_apply(*args).to(torch_dtype(self.dtype))


def _entries(step: Step) -> list[tuple[str, dict[str, Any], KeyPath]]:
    out = []
    for i, item in enumerate(step.spec["from"]):
        path = step.key_path + ("from", i)
        if isinstance(item, str):
            out.append((item, {}, path))
        else:
            out.append((item["model"], {k: v for k, v in item.items() if k != "model"}, path))
    return out


def _check_value(spec: Any, value: Any, path: KeyPath, recipe: Recipe,
                 errors: list[RecipeError]) -> None:
    if spec.type == "bool":
        if not isinstance(value, bool):
            errors.append(recipe.error(path, f"`{spec.name}` is true or false, got {value!r}"))
    elif spec.type == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            errors.append(recipe.error(path, f"`{spec.name}` is an integer, got {value!r}"))
    elif value is None:
        if not spec.nullable:
            errors.append(recipe.error(path, f"`{spec.name}` needs a number"))
    elif isinstance(value, (bool, str)):
        errors.append(recipe.error(path, f"`{spec.name}` needs a number, a gradient or rules, "
                                   f"got {value!r}"))


def check_merge(step: Step, recipe: Recipe) -> list[RecipeError]:
    """Every way the step breaks its method's contract (base policy, input counts, parameter
    names, types and required values), from the recipe alone: the op's document check, run
    before any input is resolved."""
    errors: list[RecipeError] = []
    spec = METHODS[step.spec["method"]]
    _, entries = _check_inputs(step, spec, recipe, errors)
    _check_parameters(step, spec, entries, recipe, errors)
    _check_required(step, spec, entries, recipe, errors)
    names = [n for n, _, _ in _entries(step)] + ([step.spec["base"]] if step.spec.get("base")
                                                 else [])
    errors += check_tokenizer(step, recipe, names, step.spec.get("base") or names[0]
                              if names else None)
    return errors


def validate_merge(step: Step, recipe: Recipe) -> tuple[Any, str | None, list]:
    """Check the step against the method's contract; return (spec, base name, inputs)."""
    errors = check_merge(step, recipe)
    if errors:
        raise RecipeErrors(errors)
    spec = METHODS[step.spec["method"]]
    base, entries = _check_inputs(step, spec, recipe, [])
    return spec, base, entries


def _check_inputs(step: Step, spec: Any, recipe: Recipe, errors: list[RecipeError]
                  ) -> tuple[str | None, list[tuple[str, dict[str, Any], KeyPath]]]:
    """The base and the non-base entries, checked against the method's base policy and input
    counts; a pair method's `from: [A, B]` gives base A."""
    method = spec.name
    entries = _entries(step)
    base = step.spec.get("base")
    seen: set[str] = set()
    for name, _, path in entries:
        if name in seen:  # mergekit: "Duplicate merge inputs"; a TIES vote would count it twice
            errors.append(recipe.error(path, f"'{name}' is already listed in `from`",
                                       hint="list each model once (mergekit refuses "
                                       "duplicate merge inputs too)"))
        seen.add(name)
    if spec.pair:
        if base is not None:
            errors.append(recipe.error(step.key_path + ("base",), f"{method} takes `from: [A, B]` "
                                       "(t = 0 gives A) and no `base:`", key=True))
        if len(entries) != 2:
            errors.append(recipe.error(step.key_path + ("from",),
                                       f"{method} merges exactly two models: `from: [A, B]`"))
            return base, entries
        return entries[0][0], entries[1:]
    if spec.base == "required" and base is None:
        errors.append(recipe.error(step.key_path, f"method {method} needs `base:` (the "
                                   "model the others are deltas from)", key=True))
    if spec.base == "ignored" and base is not None:
        errors.append(recipe.error(step.key_path + ("base",), f"method {method} takes no "
                                   "base; list every model under `from`", key=True))
    if base is not None and any(name == base for name, _, _ in entries):
        errors.append(recipe.error(step.key_path + ("base",), f"'{base}' is the base and "
                                   "must not also appear in `from`"))
    n = len(entries)
    lo, hi = spec.min_non_base, spec.max_non_base
    if n < max(lo, 1) or (hi is not None and n > hi):
        want = f"{lo}" if lo == hi else f"at least {max(lo, 1)}" if hi is None else (
            f"{lo} to {hi}")
        errors.append(recipe.error(step.key_path + ("from",), f"method {method} takes {want} "
                                   f"model(s) in `from` (besides the base), got {n}"))
    return base, entries


def _check_parameters(step: Step, spec: Any, entries: list, recipe: Recipe,
                      errors: list[RecipeError]) -> None:
    """Every key under `parameters` and in the `from` entries is one of the method's (per-input
    ones only in entries), with a value of its type."""
    method = spec.name
    known = {p.name: p for p in spec.params}
    per_input = {k for k, p in known.items() if p.scope != "shared"}
    for key, value in step.spec.get("parameters", {}).items():
        path = step.key_path + ("parameters", key)
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            errors.append(recipe.error(path, f"unknown parameter for method {method}",
                                       hint=(f"did you mean '{close[0]}'? " if close else "")
                                       + "parameters: " + ", ".join(known), key=True))
        else:
            _check_value(known[key], value, path, recipe, errors)
    for _, params, path in entries:
        for key, value in params.items():
            if key not in per_input:
                close = difflib.get_close_matches(key, sorted(per_input), n=1)
                where = "a method-wide parameter: put it under `parameters`" if key in known \
                    else "unknown parameter for method " + method
                errors.append(recipe.error(path + (key,), where, key=True, hint=(
                    f"did you mean '{close[0]}'? " if close and key not in known else "")
                    + "per-input parameters: " + (", ".join(sorted(per_input)) or "none")))
            else:
                _check_value(known[key], value, path + (key,), recipe, errors)


def _check_required(step: Step, spec: Any, entries: list, recipe: Recipe,
                    errors: list[RecipeError]) -> None:
    """Each required parameter is given: under `parameters`, or (per-input) in every entry."""
    method = spec.name
    shared_given = step.spec.get("parameters", {})
    for p in spec.params:
        if not p.required or p.name in shared_given:
            continue
        if p.scope == "shared":
            errors.append(recipe.error(step.key_path, f"method {method} needs "
                                       f"`parameters: {{{p.name}: ...}}`", key=True))
        else:
            missing = [path for _, params, path in entries if p.name not in params]
            errors += [recipe.error(path, f"method {method} needs a `{p.name}` for each input "
                                    f"(`{{model: ..., {p.name}: ...}}`, or one value under "
                                    "`parameters`)") for path in missing]


def build_merge(step: Step, models: Mapping[str, VirtualModel], recipe: Recipe) -> VirtualModel:
    """Build the `merge` step's virtual model (see the module docstring).

    Raises:
        RecipeErrors: contract violations (base, inputs, parameters), misaligned inputs, rules
            that miss a tensor.
    """
    spec, base_name, entries = validate_merge(step, recipe)
    names = ([base_name] if base_name else []) + [name for name, _, _ in entries]
    total, files, ids = None, {}, {}
    stand_ins = with_stand_in_heads(step.name, names, models)  # a tied model's head
    models = {**models, **stand_ins}
    if "tokenizer" in step.spec:  # permute the vocabulary tables first (steps/vocab.py)
        order = names if spec.pair else names[1:] + names[:1] if base_name else names
        aligned, total, files, ids = align_inputs(step, order, models, recipe, base_name)
        models = {**models, **aligned}
    errors = check_aligned(step, names, models, recipe)
    if errors:
        raise RecipeErrors(errors)
    first = models[names[0]]
    shared = dict(step.spec.get("parameters", {}))
    seed = int(step.spec.get("seed", 0))
    compute = step.spec.get("compute_dtype")
    tensors: dict[str, Node] = {}
    outside: dict[str, tuple[float, str]] = {}  # a share outside [0, 1]: its first value
    merged: list[str] = []  # the tensors parameters are resolved for
    for name, donor_node in first.tensors.items():
        operands = tuple(models[m].tensors[name] for m, _, _ in entries)
        base = models[base_name].tensors[name] if base_name else None
        every = operands + ((base,) if base is not None else ())
        if not all(is_floating(n.dtype) for n in every):
            tensors[name] = donor_node  # integer buffers pass through from the donor
            continue
        merged.append(name)
        dtype = promote([n.dtype for n in every])
        native = compute is not None
        if native:  # mergekit's way: inputs cast to the compute dtype, computed in it
            dtype = dtype if compute == "inputs" else NAME_TO_CODE[compute]
            operands = tuple(cast(o, dtype) for o in operands)
            base = cast(base, dtype) if base is not None else None
        try:
            params = _resolve_for(spec, shared, entries, name, first)
        except ParamError as e:
            raise RecipeErrors([recipe.error(step.key_path + e.where, str(e))]) from None
        _check_della(spec, params, name, step, recipe)
        _check_weight_sum(spec, params, name, step, recipe)
        _note_shares(params, name, outside)
        if spec.name == "passthrough" and params.get("scale") in (None, (None,), (1.0,)):
            tensors[name] = cast(operands[0], dtype)  # scale 1 is a copy
            continue
        if spec.name == "slerp":  # coefficients whole, output by rows (`Slerp`)
            a, b = base, operands[0]  # `from: [A, B]`: A is the base (t = 0)
            assert a is not None
            coefficients = intern(SlerpCoefficients(a, b, float(params["t"])))
            tensors[name] = intern(Slerp(a, b, coefficients, dtype, native))
            continue
        streamed = streamed_task_vectors(spec, operands, base, params, seed, name, dtype,
                                         native, step.spec.get("random_masks", "stream"))
        if streamed is None:  # arcee_fusion, ramplus_tl, nuslerp by columns
            streamed = streamed_merge(spec.name, operands, base, params, seed=seed,
                                      tensor=name, dtype=dtype, native=native)
        if streamed is None and not native:
            streamed = streamed_gram(spec.name, operands, base, params, dtype)
        if streamed is None and not native and spec.name == "sce":
            from recipekit.steps.task_vectors import streamed_sce

            streamed = streamed_sce(operands, base, params, dtype)
        tensors[name] = streamed or intern(Merge(
            spec.name, operands, base, tuple(sorted(params.items())),
            seed if spec.random else 0, name if spec.random else "", dtype, native))
    _warn_unmatched(step, recipe, shared, entries, merged)
    for key, (value, tensor) in outside.items():
        log.warning("step '%s': %s %g (tensor `%s`, and maybe others) is %s: %s keeps %s "
                    "entry there, as %s does (mergekit's reading); a share is a number in "
                    "[0, 1], e.g. 0.15 for 15%%", step.name, key, value, printable(tensor),
                    "above 1" if value > 1 else "below 0", spec.name,
                    "every" if value > 1 else "no", "1" if value > 1 else "0")
    config, changed = first.config, first.changed
    if total is not None:
        config, changed = vocab_config(first, total, ids)
    if stand_ins:  # the merged head is stored: not the embedding table
        config, changed = untied_config(config, changed, first.stack.family, tensors)
    return VirtualModel(step.name, config, tensors, first.stack, first.donor, changed,
                        files=files)


def streamed_task_vectors(spec: Any, operands: tuple[Node, ...], base: Node | None,
                          params: Mapping[str, Any], seed: int, tensor: str, dtype: str,
                          native: bool, random_masks: str) -> Node | None:
    """The streamed nodes of a pruning task-arithmetic method (steps/task_vectors.py), or
    None where the whole-tensor `Merge` stays: mergekit's random draw asked for
    (`random_masks: mergekit`). DELLA ranks a vector as one row: it streams in one piece."""
    from recipekit.steps.task_vectors import (
        STREAMED_SPARSIFIERS,
        PrunedMerge,
        PruneStats,
        needs_stats,
        stream_key,
        work_dtype,
    )

    sparsify = dict(spec.fixed).get("sparsify")
    if sparsify not in STREAMED_SPARSIFIERS or base is None:
        return None
    if spec.random and random_masks == "mergekit":
        return None
    kw = resolve_params(spec, params, len(operands))
    work = work_dtype(operands + (base,), native)
    keys = tuple(stream_key(seed, tensor, i) for i in range(len(operands))) if spec.random \
        else (0,) * len(operands)
    stats = None
    if needs_stats(sparsify, kw["rescale"]):
        from recipekit.graph.passes import mask_words
        from recipekit.plan.cost import KEPT_BYTES, streams_from_files

        fields = (operands, base, sparsify, tuple(float(d) for d in kw["densities"]),
                  tuple(float(g) for g in kw.get("gamma", (0.0,) * len(operands))),
                  tuple(float(e) for e in kw.get("epsilon", (0.0,) * len(operands))), keys,
                  bool(kw["rescale"]), work)
        # a random mask drawn for the L1 rescale is kept as bits for the output pass (1/16 of
        # bf16 inputs), up to `KEPT_BYTES`. From the files only DELLA's: its masks rank every
        # row (~12 ns a value); DARE's draw (~1.5) cost about what keeping and reading the
        # bits did there (Mistral-7B width, 2 cores), and more memory
        keep = spec.random and kw["rescale"] and 8 * len(operands) * mask_words(base.numel) \
            <= KEPT_BYTES and (sparsify == "della_magprune"
                               or not streams_from_files(PruneStats(*fields)))
        stats = intern(PruneStats(*fields, cache_masks=keep))
    return intern(PrunedMerge(spec.name, operands, base, stats, tuple(sorted(params.items())),
                              keys, work, dtype))


#: parameters that are a share of the entries to keep: a value outside [0, 1] is kept as 0 or 1
#: by mergekit and here, but it is most likely a slip (``density: 15`` meant as 15%)
_SHARES = ("density", "select_topk")


def _note_shares(params: Mapping[str, Any], tensor: str,
                 outside: dict[str, tuple[float, str]]) -> None:
    """Record in ``outside`` the first value of each share parameter outside [0, 1]."""
    for key in _SHARES:
        value = params.get(key)
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(v, (int, float)) and not 0 <= v <= 1 and key not in outside:
                outside[key] = (float(v), tensor)


def _check_weight_sum(spec: Any, params: Mapping[str, Any], tensor: str, step: Step,
                      recipe: Recipe) -> None:
    """A normalized linear merge whose weights sum to 0 divides by 0: every value of the
    tensor would be NaN or ±Inf (mergekit writes them; recipekit's run did too, and only
    `--check-finite` said so). Known from the recipe, so `validate` refuses it.

    Raises:
        RecipeErrors: located at the step, naming the first such tensor.
    """
    weights = params.get("weight")
    if spec.name != "linear" or not params.get("normalize", True) or not weights:
        return
    if math.fsum(float(w) for w in weights if w is not None) == 0.0:
        raise RecipeErrors([recipe.error(
            step.key_path, f"the weights of {quote_name(tensor)} sum to 0 and `normalize` is "
            "on: every merged value would be 0/0 or ±x/0 (NaN, Inf)",
            hint="change the weights, or set `parameters: {normalize: false}` for a plain "
            "weighted sum (e.g. a difference of two models)")])


def _check_della(spec: Any, params: Mapping[str, Any], tensor: str, step: Step,
                 recipe: Recipe) -> None:
    """DELLA keeps entries with probabilities spread over density ± epsilon, which must lie
    inside (0, 1) for every density below 1 (`ops.sparsify.della_prune` refuses otherwise),
    and DARE's draw needs a density of at least 0 (`ops.stream_prune` refuses otherwise): a
    recipe `validate` passed must not fail in `run` (issue 17 item 11).

    Raises:
        RecipeErrors: located at `parameters.epsilon` (DELLA; or the step when it is the
            default), or at the step (DARE's density, which may come from any input).
    """
    sparsify = dict(spec.fixed).get("sparsify")
    if sparsify == "random":
        for i, d in enumerate(params.get("density", ())):
            if d is not None and d < 0:  # a draw needs a probability (mergekit fails too)
                raise RecipeErrors([recipe.error(
                    step.key_path, f"{spec.name} keeps each entry with probability density, "
                    f"but the density of its input {i + 1} is {d:g} for tensor "
                    f"`{printable(tensor)}`", hint="give a density in [0, 1]")])
    if sparsify != "della_magprune":
        return
    default = next(p.default for p in spec.params if p.name == "epsilon")
    densities = params.get("density", ())
    epsilons = params.get("epsilon", (default,) * len(densities))
    for d, eps in zip(densities, epsilons, strict=False):
        if d is not None and eps is not None and 0 < d < 1 and not (d - eps > 0 and d + eps < 1):
            given = "epsilon" in step.spec.get("parameters", {})
            where = step.key_path + (("parameters", "epsilon") if given else ())
            raise RecipeErrors([recipe.error(
                where, f"DELLA needs density ± epsilon inside (0, 1), but density {d:g} and "
                f"epsilon {eps:g} give [{d - eps:g}, {d + eps:g}] for tensor "
                f"`{printable(tensor)}`", hint="choose an epsilon below min(density, "
                "1 − density)")])


def _warn_unmatched(step: Step, recipe: Recipe, shared: Mapping[str, Any], entries: list,
                    names: list[str]) -> None:
    """Warn for each parameter rule (method-wide or per input) that matches none of the
    merged tensors ``names``: it never applies (`params.warn_unmatched_rules`)."""
    for key, value in shared.items():
        warn_unmatched_rules(recipe, step.name, step.key_path + ("parameters", key), value,
                             names)
    for _, params, path in entries:
        for key, value in params.items():
            warn_unmatched_rules(recipe, step.name, path + (key,), value, names)


def _resolve_for(spec: Any, shared: Mapping[str, Any], entries: list, tensor: str,
                 model: VirtualModel) -> dict[str, Any]:
    """Parameter values for one tensor: numbers, bools and ints as given, numeric parameters
    resolved (gradients, rules), per-input ones as a tuple aligned with the inputs."""
    out: dict[str, Any] = {}

    def value(p: Any, raw: Any, where: KeyPath) -> Any:
        if p.type in ("bool", "int") or raw is None:
            return raw
        if is_constant(raw):
            return float(raw)
        try:
            return resolve(raw, tensor, model.stack)
        except ParamError as e:
            raise ParamError(e.message, e.hint, where) from None

    for p in spec.params:
        shared_at = ("parameters", p.name)
        if p.scope == "shared":
            if p.name in shared:
                out[p.name] = value(p, shared[p.name], shared_at)
            continue
        raws = [(params[p.name], path[-2:] + (p.name,)) if p.name in params else  # from[i]
                (shared.get(p.name), shared_at) for _, params, path in entries]
        if all(r is None for r, _ in raws) and p.name not in shared:
            continue  # the kernel's default
        out[p.name] = tuple(value(p, r, where) if r is not None else p.default
                            for r, where in raws)
    return out


#: this module's ops (listed once in `recipekit.steps`)
OPS = (
    Op("merge", build_merge, "merge_step", check=check_merge),
)

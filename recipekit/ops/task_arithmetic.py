"""The task-arithmetic family: task vectors from a base, pruned, sign-elected and summed.

`generalized_task_arithmetic` is the kernel of eight mergekit methods; each of them is its
`MethodSpec` in `recipekit.merge` (sparsifier, sign consensus, parameters, defaults) and its
kernel here is made from that spec by `_named_kernel`, so a new variant is one spec. `sce` and
`model_stock` weigh the task vectors their own way. Numerics as in `recipekit.ops.merge`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from recipekit.merge import METHODS
from recipekit.ops.operands import Floats, check_inputs, per_input
from recipekit.ops.precision import numpy_floats
from recipekit.ops.sparsify import (
    CONSENSUS_METHODS,
    SPARSIFIERS,
    compute_dtype,
    elect_sign,
    sce_topk_mask,
    sign_consensus_mask,
)
from recipekit.ops.sparsify import sparsify as sparsify_delta


def generalized_task_arithmetic(
        base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weights: Floats,
        densities: Floats = 1.0, sparsify: str | None = None, consensus: str | None = None,
        lambda_: float = 1.0, normalize: bool = False, rescale: bool = False,
        gamma: Floats = 0.01, epsilon: Floats = 0.15, int8_mask: bool = False,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Task arithmetic with optional pruning and sign consensus: the kernel of 8 methods.

    Formula (per tensor, in order): M = 0 returns θ_b. τ_i = θ_i − θ_b;
    τ̃_i = sparsify(τ_i; d_i, γ_i | ε_i, rescale) on |τ_i| of each model alone (weights never
    change the selection); δ_i = w_i·τ̃_i. With consensus: s = elected sign of Σδ
    (`sparsify.elect_sign`), m_i = [sign δ_i = s], Δ = Σ m_i δ_i, D = Σ m_i w_i elementwise
    (D = 0 → 1). Without: Δ = Σ δ_i, D = Σ w_i (|D| < 1e-8 → 1). If `normalize`, Δ ← Δ/D; if
    λ ≠ 1, Δ ← λΔ; out = θ_b + Δ. Negative weights are allowed (with normalize a lone
    negative weight cancels).

    Papers: Ilharco et al. 2022 (task arithmetic), https://arxiv.org/abs/2212.04089; TIES,
    DARE, breadcrumbs, DELLA (see the named wrappers).
    Shapes: base and M × [...] → [...]. Oracle: mergekit 0.1.5 goldens for each named
    method (same seed for the random ones).

    Args:
        base: θ_b.
        tensors: θ_1 … θ_M.
        weights: w_i, one per non-base input.
        densities: d_i (unused without a sparsifier).
        sparsify: None or one of `sparsify.SPARSIFIERS`.
        consensus: None or one of `sparsify.CONSENSUS_METHODS`.
        lambda_: the final scale λ (mergekit's `lambda`).
        normalize: divide by D.
        rescale: L1 rescaling inside the sparsifier.
        gamma: breadcrumbs' outlier fraction γ_i.
        epsilon: DELLA's half-width ε_i.
        int8_mask: hold signs as int8 in the consensus (less memory, same result).
        generator: required with the "random" and "della_magprune" sparsifiers.

    Returns:
        The fp32 (fp64) merged tensor.

    Raises:
        ValueError: unknown sparsifier/consensus, no generator for a random one, counts or
            shapes that do not line up, or the sparsifier's own errors (DELLA's ε, rows of 1).

    Example:
        >>> base = torch.zeros(3)
        >>> task_arithmetic(base, [torch.tensor([1.0, 2.0, 3.0])], weights=[0.5])
        tensor([0.5000, 1.0000, 1.5000])
    """
    check_inputs("task arithmetic", [base, *tensors])
    if sparsify is not None and sparsify not in SPARSIFIERS:
        raise ValueError(f"unknown sparsifier {sparsify!r}; expected one of "
                         f"{', '.join(SPARSIFIERS)}")
    if consensus is not None and consensus not in CONSENSUS_METHODS:
        raise ValueError(f"unknown sign consensus {consensus!r}; expected 'sum' or 'count'")
    if sparsify in ("random", "della_magprune") and generator is None:
        raise ValueError(f"the {sparsify!r} sparsifier is random: pass a torch.Generator")
    m = len(tensors)
    dtype = compute_dtype(base, *tensors)
    b = base.to(dtype)
    if m == 0:
        return b.clone() if b is base else b
    w = per_input("weight", weights, m)
    d = per_input("density", densities, m)
    g = per_input("gamma", gamma, m)
    e = per_input("epsilon", epsilon, m)

    deltas = torch.empty((m, *b.shape), dtype=dtype, device=b.device)
    for i, x in enumerate(tensors):
        tau = x.to(dtype) - b
        if sparsify is not None:
            tau = sparsify_delta(tau, sparsify, density=d[i], rescale=rescale, gamma=g[i],
                                 epsilon=e[i], generator=generator)
        deltas[i] = tau
        del tau
    return combine_task_vectors(b, deltas, w, consensus=consensus, normalize=normalize,
                                lambda_=lambda_, int8_mask=int8_mask)


def combine_task_vectors(b: torch.Tensor, deltas: torch.Tensor, weights: Sequence[float], *,
                         consensus: str | None, normalize: bool, lambda_: float,
                         int8_mask: bool = False) -> torch.Tensor:
    """The tail of `generalized_task_arithmetic` once the task vectors are pruned: weigh, elect
    signs, sum, normalize, scale, add to the base (formula there). Elementwise, so the streamed
    merges (steps/task_vectors.py) call it on row pieces. ``deltas`` [M, ...] is consumed.

    Why it is written this way: it is the output pass of TIES and DARE-TIES, run on every value
    of the model, so it avoids the ops that are slow on the CPU (a bool mask's `masked_fill_`
    or `where` costs ~4 ns per value, ten times an arithmetic op). With s = ±1 the elected
    sign, the agreeing part of δ_i is max(s·δ_i, 0) = |δ_i|·m_i, so Δ = s·Σ max(s·δ_i, 0) and
    m_i = sign(max(s·δ_i, 0)): the same values as summing δ_i·m_i (negation is exact), except
    the sign of a zero sum. ``int8_mask`` changes nothing here (no per-entry sign tensor is
    held); it stays for mergekit's configs.
    """
    m = deltas.shape[0]
    wt = torch.tensor(list(weights), dtype=deltas.dtype,
                      device=b.device).reshape((m,) + (1,) * b.dim())
    deltas.mul_(wt)

    if consensus is not None and m == 1 and float(wt.min()) > 0:
        # one task vector always agrees with the sign it elects: Δ = δ, D = w (also where
        # δ = 0, whose D of 0 is lifted to w below); the same values without the election
        mixed = deltas[0]
        divisor = wt[0] if normalize else None
    elif consensus is not None:
        s = elect_sign(deltas, method=consensus)
        agreeing = deltas.mul_(s).clamp_min_(0)  # |δ_i| where sign δ_i = s, else 0
        mixed = agreeing.sum(dim=0).mul_(s)
        divisor = agreeing.sign_().mul_(wt).sum(dim=0) if normalize else None
        if divisor is not None:
            low = float(wt.min())
            if low > 0:  # D is 0 or at least the smallest weight: lift 0 to it (Δ = 0
                divisor.clamp_min_(low)  # there, and 0 / w = 0 / 1)
            else:
                divisor.add_(divisor == 0)
    else:
        mixed = deltas.sum(dim=0)
        divisor = wt.sum(dim=0)
        divisor.masked_fill_(divisor.abs() < 1e-8, 1)
    del deltas
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return mixed.add_(b)


def _named_kernel(name: str, example: str) -> Callable[..., torch.Tensor]:
    """Method `name` as a kernel: `generalized_task_arithmetic` with the sparsifier, sign
    consensus, keywords and defaults of ``METHODS[name]``.

    Why generated: the defaults (normalize, rescale, density, ...) are the method's contract and
    are written once, in its `MethodSpec`; this function only gives them a signature, which
    `inspect.signature` shows and which rejects unknown or missing keywords as a def would.
    `example` is a doctest (run through `ops.merge.__test__`).
    """
    spec = METHODS[name]
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
              for n in ("base", "tensors")]
    params += [inspect.Parameter(p.kwarg, keyword, default=inspect.Parameter.empty
                                 if p.required else p.default) for p in spec.params]
    if spec.random:
        params.append(inspect.Parameter("generator", keyword))
    signature = inspect.Signature(params)
    fixed = dict(spec.fixed)

    def kernel(*args: Any, **kwargs: Any) -> torch.Tensor:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return generalized_task_arithmetic(**bound.arguments, **fixed)

    options = ", ".join(f"{k}={v!r}" for k, v in spec.fixed) or "no sparsifier, no consensus"
    kernel.__name__ = kernel.__qualname__ = name
    kernel.__signature__ = signature  # type: ignore[attr-defined]
    kernel.__doc__ = (f"{spec.summary}.\n\n`generalized_task_arithmetic` with {options}; "
                      f"parameters and defaults: `recipekit.merge.METHODS[{name!r}]`.\n"
                      f"Paper: {spec.paper}.\n\nExample:\n{example}\n")
    return kernel


task_arithmetic = _named_kernel("task_arithmetic", """\
    >>> task_arithmetic(torch.zeros(2), [torch.ones(2), -torch.ones(2)], weights=[1, 0.5])
    tensor([0.5000, 0.5000])""")
ties = _named_kernel("ties", """\
    >>> ties(torch.zeros(2), [torch.tensor([1.0, -1.0]), torch.tensor([3.0, 1.0])],
    ...      weights=[1, 1])
    tensor([2., 1.])""")
dare_linear = _named_kernel("dare_linear", """\
    >>> g = torch.Generator().manual_seed(0)
    >>> dare_linear(torch.zeros(4), [torch.ones(4)], weights=[1], densities=[0.5],
    ...             generator=g)
    tensor([1.3333, 0.0000, 1.3333, 1.3333])""")
dare_ties = _named_kernel("dare_ties", """\
    >>> g = torch.Generator().manual_seed(0)
    >>> dare_ties(torch.zeros(2), [torch.ones(2)], weights=[1], generator=g)
    tensor([1., 1.])""")
breadcrumbs = _named_kernel("breadcrumbs", """\
    >>> breadcrumbs(torch.zeros(4), [torch.tensor([4.0, 3.0, 2.0, 1.0])], weights=[1],
    ...             densities=[0.5], gamma=[0.25])
    tensor([0., 3., 2., 0.])""")
breadcrumbs_ties = _named_kernel("breadcrumbs_ties", """\
    >>> breadcrumbs_ties(torch.zeros(2), [torch.tensor([1.0, -1.0])], weights=[1])
    tensor([ 1., -1.])""")
della = _named_kernel("della", """\
    >>> g = torch.Generator().manual_seed(0)
    >>> della(torch.zeros(2), [torch.ones(2)], weights=[1], generator=g)
    tensor([1., 1.])""")
della_linear = _named_kernel("della_linear", """\
    >>> g = torch.Generator().manual_seed(0)
    >>> della_linear(torch.zeros(2), [torch.ones(2)], weights=[2], generator=g)
    tensor([2., 2.])""")


def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, select_topk: float = 1.0,
        int8_mask: bool = False) -> torch.Tensor:
    """SCE: select high-variance entries, weight task vectors by their energy, erase sign
    conflicts.

    Formula: T = stack(τ_i). Select (f < 1): T ← T ⊙ `sparsify.sce_topk_mask`(T, f).
    Erase: e_i = [sign τ_i = s], s the **unweighted** elected sign of Σ τ_i. Calculate:
    c_i = mean(τ_i²) over the (selected) tensor, ω_i = c_i/Σc (1/M if Σc < 1e-6 — an absolute
    threshold, so small fine-tuning deltas usually get uniform weights). out = θ_b +
    Σ ω_i e_i τ_i / max(Σ ω_i e_i, 1e-6). No user weights. M = 0 returns θ_b.

    Paper: Wan et al. 2024, "FuseChat", https://arxiv.org/abs/2408.07990.
    Shapes: base and M × [...] → [...]. Oracle: mergekit 0.1.5 `sce` goldens.

    Args:
        base: θ_b.
        tensors: θ_1 … θ_M.
        select_topk: the fraction f of entries kept by variance.
        int8_mask: signs held as int8 (same result).

    Returns:
        The fp32 (fp64) merged tensor.

    Example:
        >>> sce(torch.zeros(2), [torch.tensor([1.0, -1.0]), torch.tensor([1.0, 1.0])])
        tensor([1., 1.])
    """
    check_inputs("sce", [base, *tensors])
    dtype = compute_dtype(base, *tensors)
    if not tensors:
        b = base.to(dtype)
        return b.clone() if b is base else b
    if base.dim() == 0:
        b = base.to(dtype)
        deltas = torch.stack([x.to(dtype) - b for x in tensors])
        if select_topk < 1:
            deltas.mul_(sce_topk_mask(deltas, fraction=select_topk))
        return sce_combine(b, deltas, _sce_weights(deltas), int8_mask)
    # every step but the energies is elementwise: by row pieces, as `sce_combine` says why
    step = max(1, COMBINE_ELEMS // max(1, base[0].numel()))
    pieces = [slice(lo, lo + step) for lo in range(0, base.shape[0], step)]
    deltas = torch.empty((len(tensors), *base.shape), dtype=dtype, device=base.device)
    for rows in pieces:
        task_vectors([*(x[rows] for x in tensors), base[rows]], dtype, out=deltas[:, rows])
    if select_topk < 1:
        mask = sce_topk_mask(deltas, fraction=select_topk, piece_elems=COMBINE_ELEMS)
        for rows in pieces:
            deltas[:, rows].mul_(mask[rows])
    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    omega = _sce_weights(deltas, scratch=out if torch.get_num_threads() == 1 else None)
    for rows in pieces:
        out[rows] = sce_combine(base[rows].to(dtype), deltas[:, rows], omega, int8_mask)
    return out


def task_vectors(pieces: Sequence[torch.Tensor], dtype: torch.dtype,
                 base: torch.Tensor | None = None, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """τ_i = θ_i − θ_b of one piece (the base last), stacked [M, ...] in ``dtype``, each
    subtracted into its place (a stack of the differences copied every value once more), a
    narrower θ_i widened inside the subtraction (exact, and no converted copy): SCE's whole
    kernel by rows, its streamed passes and the output pass of TIES/DARE/DELLA. ``base``: the
    base piece already in ``dtype``; ``out``: where to put them (a new tensor when None)."""
    b = pieces[-1].to(dtype) if base is None else base
    if out is None:
        out = torch.empty((len(pieces) - 1, *b.shape), dtype=dtype, device=b.device)
    for i, x in enumerate(pieces[:-1]):
        if torch.promote_types(x.dtype, dtype) != dtype:  # not a widening: round it first
            x = x.to(dtype)
        torch.sub(x, b, out=out[i])
    return out


def _sce_weights(deltas: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """ω_i = c_i / Σc with c_i = mean(τ_i²) over the whole (selected) task vector, one fp32
    mean as mergekit's (1/M where Σc < 1e-6). With ``scratch`` (one task vector's shape and
    dtype) each τ_i² goes there in turn, without a whole [M, ...] temporary (mapped afresh, its
    pages faulted in: 8 bytes a value of two task vectors): on one thread, as the executor
    runs whole kernels, each row's mean is the stack's bit for bit; on several, torch splits
    the stack's reduction otherwise, so callers pass no scratch there."""
    if scratch is None:
        energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    else:
        energy = torch.stack([torch.square(d, out=scratch).reshape(-1).mean() for d in deltas])
    total = energy.sum().item()
    return torch.full_like(energy, 1.0 / len(energy)) if abs(total) < 1e-6 else energy / total


#: Values per row piece of the elementwise steps of SCE's whole kernel (`sce`): the task
#: vectors, the variance keys, the selection and the erase-and-combine
COMBINE_ELEMS = 1 << 17


def sce_combine(b: torch.Tensor, deltas: torch.Tensor, omega: torch.Tensor,
                int8_mask: bool, keep: torch.Tensor | None = None) -> torch.Tensor:
    """θ_b + Σ ω_i e_i τ_i / max(Σ ω_i e_i, 1e-6) for some rows, e the sign agreement (the
    streamed SCE's output pieces too: `ops.stream_sce.sce_rows`).

    Why by rows: every op here is elementwise (the sums run over the M task vectors at each
    position), so pieces give the whole tensor's bits, and their temporaries are reused from
    the heap where whole-tensor ones fault in fresh pages on every op (~2.5 ns a value an op
    on a 2048×2048 tensor).

    ``keep``: the selection (bool, one task vector's shape), the bits of combining
    ``deltas * keep`` (see `_combine_two_numpy`)."""
    if _combines_in_numpy(b, deltas, omega, keep):
        return _combine_two_numpy(b, deltas, omega, keep)
    if keep is not None:
        deltas = deltas * keep.to(deltas.dtype).unsqueeze(0)
    agree = sign_consensus_mask(deltas, method="sum", int8=int8_mask)
    omega = omega.reshape((len(omega),) + (1,) * b.dim())
    if agree.device.type == "cpu" and numpy_floats(omega):
        # ω_i·e_i in numpy: the bool widened to 1 or 0 and one product, as torch's, at ~0.3
        # instead of ~1.3 ns a value (torch's bool-by-float product is a slow promotion)
        weights = torch.from_numpy(np.multiply(agree.numpy(), omega.numpy()))
    else:
        weights = omega * agree
    return b + (deltas * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)


def _combines_in_numpy(b: torch.Tensor, deltas: torch.Tensor, omega: torch.Tensor,
                       keep: torch.Tensor | None) -> bool:
    return (len(deltas) == 2 and deltas.dim() > 1 and b.dtype == deltas.dtype == omega.dtype
            and numpy_floats(b, deltas, omega)
            and (keep is None or (keep.dtype == torch.bool and keep.device.type == "cpu")))


def _combine_two_numpy(b: torch.Tensor, deltas: torch.Tensor, omega: torch.Tensor,
                       keep: torch.Tensor | None) -> torch.Tensor:
    """`sce_combine` of two task vectors in numpy, bit for bit torch's ops: 2.4 against 3.1 ns
    a value on a 64×2048 piece, the sign agreement's 0.7 included (torch's sums over dim 0 and
    its broadcast temporaries); with a selection 2.9 against 4.5 (`ops.stream_sce.sce_rows`).

    The sums of two are one fp32 (fp64) addition each, as torch's; torch's sum starts from +0,
    so a zero sum is +0, which ``+ 0.0`` gives (it changes no other value). A selection folds
    into the agreement: an unselected entry's weights are then 0, as the masked τ's are
    (a zero agrees with no sign), and τ_i·0 has the sign and the NaN of (τ_i·0)·0, so the
    numerator's bits are those of masking first, one product a value fewer. Oracle:
    tests/ops/test_merge.py (the formula in torch ops, special values and selections)."""
    d = deltas.numpy()
    agree = sign_consensus_mask(deltas, method="sum").numpy()
    if keep is not None:
        agree &= keep.numpy()
    w = np.multiply(agree, omega.numpy().reshape((2,) + (1,) * (d.ndim - 1)))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        # the weight first: where both are NaN, torch's SIMD loop returns the weight's NaN
        # (its scalar loop τ's, so no operand order matches torch at every position)
        num = np.multiply(w[0], d[0])
        other = np.multiply(w[1], d[1])
        num += other
        num += 0.0
        den = np.add(w[0], w[1], out=other)
        np.maximum(den, den.dtype.type(1e-6), out=den)
        num /= den
        num += b.numpy()
    return torch.from_numpy(num)


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
                filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: move from the base toward the average by a factor set by the angle.

    Formula: o_i = w_i − w_0 per vector (the whole tensor flattened, or with `filter_wise`
    each last-axis row; a 1-D tensor is one row). cos θ = mean over pairs i < j of
    clamp(o_i·o_j / max(‖o_i‖‖o_j‖, 1e-6), −1, 1) (no arccos). t = N cos θ/(1 + (N−1)cos θ),
    or 0 where |1 + (N−1)cos θ| < 1e-6; not clamped. out = t·(1/N)Σ w_i + (1 − t)·w_0.

    Paper: Jang et al. 2024, "Model Stock", https://arxiv.org/abs/2403.19522.
    Shapes: base and N ≥ 2 × [...] → [...]. Oracle: mergekit 0.1.5 `model_stock` goldens.

    Args:
        base: w_0.
        tensors: w_1 … w_N, N ≥ 2.
        filter_wise: one t per last-axis row instead of per tensor.

    Returns:
        The fp32 (fp64) merged tensor.

    Raises:
        ValueError: fewer than 2 non-base inputs.

    Example:
        >>> model_stock(torch.zeros(2), [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
        tensor([0., 0.])
    """
    check_inputs("model_stock", [base, *tensors])
    if len(tensors) < 2:
        raise ValueError(f"model_stock needs at least 2 non-base inputs, got {len(tensors)}")
    dtype = compute_dtype(base, *tensors)
    shape = base.shape
    w0 = base.to(dtype)
    ws = [x.to(dtype) for x in tensors]
    if filter_wise:
        if w0.dim() < 2:
            w0, ws = w0.reshape(1, -1), [x.reshape(1, -1) for x in ws]
    else:
        w0, ws = w0.reshape(-1), [x.reshape(-1) for x in ws]
    offsets = [x - w0 for x in ws]
    cosines = []
    for i, oi in enumerate(offsets):
        for oj in offsets[i + 1:]:
            scale = (torch.norm(oi, dim=-1) * torch.norm(oj, dim=-1)).clamp(min=1e-6)
            cosines.append(((oi * oj).sum(dim=-1) / scale).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    n * cos / torch.where(singular, torch.ones_like(denominator), denominator))
    # the blend by row pieces (flat pieces of a flattened tensor): elementwise, so the whole
    # tensor's bits, without whole-size temporaries (see `sce_combine`)
    out = torch.empty_like(w0)
    step = max(1, COMBINE_ELEMS // (w0.shape[1] if filter_wise else 1))
    for lo in range(0, w0.shape[0], step):
        part = t[lo:lo + step] if filter_wise else t
        average = sum(w[lo:lo + step] for w in ws) / n
        out[lo:lo + step] = part * average + (1 - part) * w0[lo:lo + step]
    return out.reshape(shape)

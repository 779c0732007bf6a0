"""LoRA / DoRA math: low-rank deltas, the sequential (PEFT) fold, and SVD factorisation.

Pure tensor functions, fp32 throughout (fp64 if an input is fp64); callers round once.
Formulas and their PEFT 0.21 checks: reference/adapters.md §2 (merge), §3 (combination), §5
(extraction). Oracles: tests/ops/test_lora.py (formulas) and tests/steps/test_adapters.py
(PEFT's ``merge_and_unload`` and unmerged forward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recipekit.merge import METHODS
from recipekit.ops.task_arithmetic import generalized_task_arithmetic


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def lora_delta(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], scales: Sequence[float], *,
               transposed: bool, block: int = 64) -> torch.Tensor:
    """ΔW = Σ_j s_j · B_j @ A_j, transposed when the base stores (in, out).

    Linear: A (r, in), B (out, r) → ΔW (out, in). ``transposed`` for GPT-2 `Conv1D`
    (fan_in_fan_out, base (in, out)) and embeddings (A (r, V), B (D, r), base (V, D)): ΔW =
    (Σ s_j B_j A_j)ᵀ. Each product is scaled after the matmul (PEFT's order, reference §2.1).

    Computed in blocks of ``block`` rows of ΔW (rows of B; columns of A when transposed): a
    BLAS kernel may sum in another order for another row count, so fixed blocks make rows
    ``lo:hi`` computed alone (``lo`` a multiple of ``block``) equal those of the whole ΔW bit
    for bit, which is what lets the executor fold a large tensor in row pieces.

    Example:
        >>> a, b = torch.ones(1, 2), torch.ones(3, 1)
        >>> lora_delta([(a, b)], [0.5], transposed=False).shape
        torch.Size([3, 2])
    """
    dtype = _work_dtype(*(t for pair in factors for t in pair))
    pairs = [(a.to(dtype), b.to(dtype)) for a, b in factors]
    a0, b0 = pairs[0]
    rows = a0.shape[1] if transposed else b0.shape[0]
    cols = b0.shape[0] if transposed else a0.shape[1]
    out = torch.empty((rows, cols), dtype=dtype, device=a0.device)
    for lo in range(0, rows, block):
        acc: torch.Tensor | None = None
        for (a, b), s in zip(pairs, scales, strict=True):
            term = b @ a[:, lo:lo + block] if transposed else b[lo:lo + block] @ a
            term.mul_(s)
            acc = term if acc is None else acc.add_(term)
        assert acc is not None
        out[lo:lo + block] = acc.T if transposed else acc
    return out


def scaled_sum(vectors: Sequence[torch.Tensor], scales: Sequence[float]) -> torch.Tensor:
    """Σ_j s_j · v_j in fp32 (the `lora_bias` update b' = b + s·b_B, reference §2.6)."""
    dtype = _work_dtype(*vectors)
    out = torch.zeros(vectors[0].shape, dtype=dtype, device=vectors[0].device)
    for v, s in zip(vectors, scales, strict=True):
        out.add_(v.to(dtype), alpha=s)
    return out


def fold_sequential(base: torch.Tensor, deltas: Sequence[torch.Tensor],
                    magnitudes: Sequence[torch.Tensor | None],
                    norm_dims: Sequence[int]) -> torch.Tensor:
    """Fold adapters into W₀ in list order, as PEFT ≥ 0.21 merges several active adapters.

    W₀' = W₀; plain LoRA: W_k' = W_{k-1}' + Δ_k; DoRA: W_k' = f_k ⊙ (W_{k-1}' + Δ_k) with
    f_k = m_k / ‖W₀ + Δ_k‖, the norm taken from the **original** W₀ (huggingface/peft#3608),
    over ``norm_dims[k]`` (1 for a Linear (out, in); 0 for fan_in_fan_out (in, out) and for
    embeddings (V, D)), broadcast along the other axis. So a DoRA adapter also rescales the
    deltas folded before it (reference §2.5). Computed in fp32; returns fp32.

    Example:
        >>> w = torch.tensor([[3.0, 4.0]])
        >>> fold_sequential(w, [torch.zeros(1, 2)], [torch.tensor([10.0])], [1])
        tensor([[6., 8.]])
    """
    dtype = _work_dtype(base, *deltas)
    w0 = base.to(dtype)
    out = w0.clone()
    for delta, m, dim in zip(deltas, magnitudes, norm_dims, strict=True):
        delta = delta.to(dtype)
        if m is None:
            out.add_(delta)
            continue
        norm = torch.linalg.vector_norm(w0 + delta, dim=dim, keepdim=True)
        factor = m.to(dtype).reshape(norm.shape) / norm
        out.add_(delta).mul_(factor)
    return out


def svd_factors(delta: torch.Tensor, *, rank: int, transposed: bool,
                epsilon: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` LoRA factors (A, B) with B @ A ≈ ΔW, by a truncated SVD in fp32.

    ΔW is given in the base layout (transposed for fan_in_fan_out / embeddings). With
    M = U S Vh (``full_matrices=False``): A = diag(√S_k)·Vh_k, B = U_k·diag(√S_k) (mergekit's
    "distribute scale"); components with S ≤ ``epsilon`` are zeroed, so the shapes stay
    (rank, in) and (out, rank) however many survive. The error ‖M − BA‖_F equals
    √(Σ discarded S²) (Eckart–Young). Oracle: tests/ops/test_lora.py.

    Example:
        >>> a, b = svd_factors(torch.eye(3), rank=3, transposed=False)
        >>> torch.allclose(b @ a, torch.eye(3), atol=1e-6)
        True
    """
    m = delta.to(_work_dtype(delta))
    if transposed:
        m = m.T
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = min(rank, s.shape[0])
    s = s[:k].clone()
    if epsilon > 0:
        s[s <= epsilon] = 0
    root = s.sqrt()
    a = root[:, None] * vh[:k]
    b = u[:, :k] * root[None, :]
    if k < rank:  # a module smaller than the rank: pad with zero components
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    return a.contiguous(), b.contiguous()


def _as_combine(method: str) -> tuple[str | None, str | None, bool, bool]:
    """A merge method's sparsifier, sign consensus and normalize/rescale defaults, from its
    contract (`recipekit.merge.METHODS`), so they are not written a second time here."""
    spec = METHODS[method]
    fixed = dict(spec.fixed)
    return (fixed.get("sparsify"), fixed.get("consensus"), spec.defaults["normalize"],
            spec.defaults["rescale"])


#: combine mode → (sparsifier, sign consensus, normalize, rescale) for
#: `ops.task_arithmetic.generalized_task_arithmetic`: the merge methods of those names with
#: mergekit's defaults, plus PEFT's plain `sum` and `magnitude_prune`.
COMBINE_METHODS: dict[str, tuple[str | None, str | None, bool, bool]] = {
    "sum": (None, None, False, False),
    **{method: _as_combine(method) for method in ("ties", "dare_linear", "dare_ties")},
    "magnitude_prune": ("magnitude", None, False, False),
}


def combine_deltas(method: str, deltas: Sequence[torch.Tensor], *, weights: Sequence[float],
                   density: float = 1.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Combine full adapter deltas ΔW_i with weights w_i by a merge method, in fp32.

    The deltas are task vectors over a zero base, so this is recipekit's (mergekit's) kernel
    `generalized_task_arithmetic` with mergekit's conventions: pruning looks at each ΔW_i alone
    (magnitude top-k for ties/magnitude_prune, Bernoulli(density) with ÷density rescaling for
    DARE); the TIES sign is elected on the **weighted** pruned deltas (sign of Σ w_i ΔW̃_i);
    `ties` divides by the sum of the agreeing weights Σ w_i·m_i (mergekit's normalize=true),
    `dare_ties`, `dare_linear`, `magnitude_prune` and `sum` do not divide. PEFT's
    `add_weighted_adapter(*_svd)` differs: it elects the sign unweighted and divides TIES by the
    count of agreeing adapters (reference/adapters.md §3).

    Example:
        >>> combine_deltas("sum", [torch.ones(2), torch.ones(2)], weights=[1.0, 0.5])
        tensor([1.5000, 1.5000])
    """
    sparsify, consensus, normalize, rescale = COMBINE_METHODS[method]
    zero = torch.zeros(deltas[0].shape, dtype=_work_dtype(*deltas), device=deltas[0].device)
    return generalized_task_arithmetic(
        zero, deltas, weights=list(weights), densities=density, sparsify=sparsify,
        consensus=consensus, normalize=normalize, rescale=rescale, generator=generator)

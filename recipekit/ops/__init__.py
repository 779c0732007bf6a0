"""Pure tensor math: merge kernels, pruning of task vectors, coalescing maps, LoRA math.

Every function here is a typed function of tensors and numbers. None reads or writes files,
knows about recipes, logs, or touches the global random number generator: random kernels take
an explicit `torch.Generator`. Kernels compute in fp32 (fp64 when an input is fp64) and return
that dtype; the caller rounds once to the output dtype (DESIGN.md §2 "Numerics").

Modules:
    init: fresh weights for new and re-initialized tensors (chunked seeded normals, fills).
    merge: lerp, linear, slerp, nearswap, passthrough, and `KERNELS` / `apply_method`, which
        call every merge method's kernel by its `recipekit.merge.METHODS` contract.
    spherical: nuslerp, multislerp and the Karcher mean.
    task_arithmetic: the task-arithmetic family (one kernel made from each method's
        contract), sce and model_stock.
    operands: the operand and per-input checks the merge kernels share.
    sparsify: magnitude / Bernoulli / breadcrumbs / DELLA pruning, SCE's variance top-k and
        TIES sign consensus.
"""

"""MoE router weights initialised from prompts: mergekit-moe's `cheap_embed` and `hidden` modes.

Why: `op: moe` (steps/moe.py) writes one router per layer, shape (experts, hidden). mergekit-moe
0.1.5 can set expert e's row from prompts that should reach it (reference/moe.md §3.3-3.5):

* ``cheap_embed``: the sum of the prompt tokens' embedding rows (pads masked), normalised,
  positives minus negatives, normalised again; the same vector for every layer. Only those
  rows of the embedding table are read (`CheapEmbedGates`).
* ``hidden`` (= ``hidden_last``) and ``hidden_avg``: per layer l, the base model's input to
  decoder layer l (the embedding output for l = 0) at each prompt's last token (``hidden_avg``:
  averaged over all positions of the left-padded batch, pads included), averaged over the
  prompts, positives minus negatives, normalised per layer. mergekit loads the whole base to
  get them; `HiddenGates` runs it layer by layer out of the safetensors instead
  (ops/forward.py), one layer's weights in memory at a time, in one sweep whose (layers,
  experts, hidden) result every layer's router node (`GateRows`) shares.

Prompts are tokenised as mergekit does: the BOS token's text + the prompt, no other special
tokens, left-padded (pad = BOS, else EOS); mergekit runs one batch per prompt list, the sweep
one batch of all of them, which gives the same states (see `HiddenGates.sweep`). The forward runs in
fp32 (on ``--device`` when given); mergekit computes ``hidden`` in bf16, so its routers are
within bf16 rounding (~3e-3) of these. Oracle: tests/steps/test_moe_gates.py compares with
mergekit-moe 0.1.5's `get_gate_params` (the base loaded in fp32) within 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from recipekit.errors import KeyPath, UnlocatedError
from recipekit.graph import Node, VirtualModel, intern
from recipekit.graph.passes import Sweep, SweepSource
from recipekit.inputs.tokenizer_file import KEY as TOKENIZER_KEY
from recipekit.inputs.tokenizer_file import TokenizerFiles
from recipekit.ops.forward import ForwardSpec, forward_spec
from recipekit.recipe import Recipe, Step

#: Gate modes computed from prompts (`random` and `uniform_random` are `op: moe`'s own).
PROMPT_MODES = ("cheap_embed", "hidden", "hidden_last", "hidden_avg")
#: Tensors of a decoder layer the forward reads (names within the layer); the optional ones
#: are read when the base has them (Qwen2's biases, Qwen3's q/k norms).
LAYER_WEIGHTS = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                 "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight")
OPTIONAL_WEIGHTS = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
                    "self_attn.o_proj.bias", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
                    "mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias")


@dataclass(frozen=True)
class ExpertPrompts:
    """The prompts that should (positive) and should not (negative) reach one expert."""

    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()


Batch = tuple[tuple[int, ...], ...]  # one prompt list's token ids, one tuple per prompt
#: What a sweep holds beyond the tensors `HiddenGates.workspace` counts, measured with
#: bench/moe_gates.py: 0-35 MiB from run to run at the TinyLlama shape (BLAS packing, OpenMP
#: scratch, the allocator's retained blocks).
SWEEP_OVERHEAD = 48 * 1024 * 1024


def _left_padded(batch: Batch, pad: int) -> tuple[Any, Any]:
    """(ids, real) as (prompts, longest) tensors: left padding with ``pad``, as mergekit's
    tokenizer call (``padding_side="left"``) builds the batch."""
    import torch

    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch], dtype=torch.long)
    real = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in batch])
    return ids, real


def _unit_rows(vectors: Any) -> Any:
    """Each vector over its L2 norm, the norm clamped at 1e-8 (mergekit's normalisation)."""
    return vectors / vectors.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def _lookup(rows: Any, ids: Sequence[int], ids_tensor: Any) -> Any:
    """Embedding rows for ``ids_tensor`` from ``rows`` (the rows of the sorted ``ids``)."""
    import torch

    index = {t: i for i, t in enumerate(ids)}
    where = torch.tensor([[index[int(t)] for t in row] for row in ids_tensor.tolist()],
                         dtype=torch.long, device=rows.device)
    return rows[where]


@dataclass(frozen=True, eq=False)
class CheapEmbedGates(Sweep):
    """(experts, hidden) fp32: per expert, unit(Σ embedding rows of its positive prompts'
    tokens, pads masked) minus the same for its negatives, over its L2 norm (each prompt
    list's sum is normalised before the subtraction, as mergekit's `get_cheap_embedding` does).

    Reads only the rows of the embedding table that the prompts use. Per token the row is the
    table's row exactly (what mergekit's one-hot matmul gives), summed over positions and then
    over prompts, as mergekit sums (reference/moe.md §3.3).
    """

    embed: Node
    batches: tuple[Batch, ...]
    experts: tuple[tuple[int, int], ...]  # (positive batch, negative batch or -1)
    pad: int
    dtype: str = "F32"

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (len(self.experts), self.embed.shape[1])

    @property
    def token_ids(self) -> list[int]:
        return sorted({t for b in self.batches for p in b for t in p} | {self.pad})

    @property
    def workspace(self) -> int:
        padded = sum(len(b) * max(len(p) for p in b) for b in self.batches)
        return 4 * self.embed.shape[1] * (len(self.token_ids) + 2 * padded)

    def sweep(self, source: SweepSource, whole: tuple[Any, ...]) -> Any:
        import torch

        ids = self.token_ids
        rows = source.read_rows(self.embed, ids).float()
        sums = []
        for batch in self.batches:
            tokens, real = _left_padded(batch, self.pad)
            h = _lookup(rows, ids, tokens) * real.to(rows.device).unsqueeze(-1)
            sums.append(_unit_rows(h.sum(dim=1).sum(dim=0, keepdim=True))[0])
        out = [sums[p] - (sums[n] if n >= 0 else 0) for p, n in self.experts]
        return _unit_rows(torch.stack(out)).to(torch.float32)


@dataclass(frozen=True, eq=False)
class HiddenGates(Sweep):
    """(layers, experts, hidden) fp32: per layer l and expert e, the normalised difference of
    the mean input to decoder layer l over e's positive and negative prompts, taken at each
    prompt's last token (or averaged over the padded positions: ``average``).

    `sweep` reads the embedding rows of the prompts' tokens, then each layer's weights in turn
    (layers 0..L-2: layer L-1's input needs no more), advancing every prompt batch through the
    layer with ops/forward.py and dropping the weights before reading the next layer's.
    """

    embed: Node
    weights: tuple[Node, ...]  # layers 0..L-2, `names[l]` each, flat
    names: tuple[tuple[str, ...], ...]
    batches: tuple[Batch, ...]
    experts: tuple[tuple[int, int], ...]
    pad: int
    spec: ForwardSpec
    layers: int
    average: bool
    dtype: str = "F32"

    @property
    def inputs(self) -> tuple[Node, ...]:
        return (self.embed, *self.weights)

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (self.layers, len(self.experts), self.embed.shape[1])

    @property
    def layer_bytes(self) -> int:
        """The largest layer's weights as stored."""
        sizes, i = [0], 0
        for names in self.names:
            sizes.append(sum(w.nbytes for w in self.weights[i:i + len(names)]))
            i += len(names)
        return max(sizes)

    @property
    def activation_bytes(self) -> int:
        """The batch's states and a layer's largest intermediates, fp32: q, k, v, the
        attention output and residuals (~6 hidden-wide), gate, up and their product (3
        ffn-wide), the scores and probabilities of every head."""
        h = self.embed.shape[1]
        prompts = sum(len(b) for b in self.batches)
        longest = max(max(len(p) for p in b) for b in self.batches)
        ffn = max((w.shape[0] for w in self.weights if w.shape), default=h)
        tokens = prompts * longest
        return 4 * tokens * (8 * h + 3 * ffn) + 4 * 3 * prompts * self.spec.num_heads * longest ** 2

    @property
    def workspace(self) -> int:
        """One layer's weights as stored, one of them widened to fp32, the activations, the
        result, and `SWEEP_OVERHEAD`."""
        fp32 = max(4 * w.numel for w in self.weights) if self.weights else 0
        return (self.layer_bytes + fp32 + self.activation_bytes + 2 * self.nbytes
                + SWEEP_OVERHEAD)

    def sweep(self, source: SweepSource, whole: tuple[Any, ...]) -> Any:
        import torch

        from recipekit.ops.forward import decoder_layer, padded_mask, rotary_tables

        ids = sorted({t for b in self.batches for p in b for t in p} | {self.pad})
        rows = source.read_rows(self.embed, ids).float()
        device = rows.device
        # Every prompt list in one left-padded batch, so that each weight is widened and
        # multiplied once per layer. mergekit pads each list to its own width: list b is the
        # last `widths[b]` positions of its rows here. Its real tokens see the same tokens at
        # the same relative positions (rotary embeddings are relative: equal to ~1e-7), and a
        # pad's state does not depend on its position (a pad attends to nothing).
        flat = [p for b in self.batches for p in b]
        tokens, real = _left_padded(tuple(flat), self.pad)
        real = real.to(device)
        h = _lookup(rows, ids, tokens)
        del rows
        mask = padded_mask(real, self.spec.sliding_window)
        rope = rotary_tables(self.spec, tokens.shape[1], device)
        spans, first = [], 0
        for b in self.batches:
            spans.append((first, first + len(b), max(len(p) for p in b)))
            first += len(b)
        per_layer = []
        start = 0
        for layer in range(self.layers):
            per_layer.append([self._summary(h[lo:hi, h.shape[1] - width:])
                              for lo, hi, width in spans])
            if layer == self.layers - 1:
                break
            names = self.names[layer]
            w = {n: source.read(x)
                 for n, x in zip(names, self.weights[start:start + len(names)], strict=True)}
            start += len(names)
            h = decoder_layer(h, w, self.spec, rope, mask)
            del w
        out = torch.stack([torch.stack([
            summaries[p] - (summaries[n] if n >= 0 else 0) for p, n in self.experts])
            for summaries in per_layer])
        return _unit_rows(out).to(torch.float32)

    def _summary(self, h: Any) -> Any:
        """Mean over prompts of the last position's state (``average``: of the mean over all
        positions), summed then divided as mergekit does."""
        v = h.sum(dim=1) / h.shape[1] if self.average else h[:, -1, :]
        return v.sum(dim=0) / v.shape[0]

    def describe(self) -> str:
        """What the plan says this forward costs."""
        from recipekit.units import format_size

        prompts = sum(len(b) for b in self.batches)
        tokens = sum(len(p) for b in self.batches for p in b)
        return (f"forward of the base through {self.layers - 1} layer(s) for {prompts} prompt(s) "
                f"({tokens} tokens, {len(self.batches)} batch(es)), one layer's weights "
                f"(~{format_size(self.layer_bytes)}) in memory at a time; holds "
                f"~{format_size(self.workspace)}")


@dataclass(frozen=True, eq=False)
class GateRows(Node):
    """Layer ``layer``'s (experts, hidden) router from a `HiddenGates` sweep."""

    gates: Node
    layer: int
    dtype: str = "F32"

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.gates.shape[1:]

    def compute(self, args: tuple[Any, ...]) -> Any:
        return args[0][self.layer].clone()


def tokenize_prompts(tok: Any, bos: str | None, prompts: Sequence[str]) -> Batch:
    """Token ids of each prompt as mergekit-moe tokenises it (``tok``: a `tokenizers`
    Tokenizer): the BOS token's text prepended, no special tokens added (reference/moe.md
    §4.2). transformers 5 rebuilds some families' pipeline from the model type (Qwen2's
    byte-level split) rather than reading tokenizer.json's; the two agree for a tokenizer.json
    that transformers saved, as published checkpoints' are."""
    enc = tok.encode_batch([(bos or "") + p for p in prompts], add_special_tokens=False)
    return tuple(tuple(e.ids) for e in enc)


def prompt_gate_nodes(step: Step, recipe: Recipe, base: VirtualModel,
                      prompts: Sequence[ExpertPrompts], mode: str, *,
                      mode_key: KeyPath = ("gate_mode",),
                      prompt_key: Callable[[int], KeyPath] | None = None) -> list[Node]:
    """One fp32 router-weight node per layer of `base`, shape (len(prompts), hidden).

    Args:
        step: the `op: moe` step (its ``files`` hold the base's tokenizer, inputs/
            tokenizer_file.py); errors are located at its keys.
        base: the model whose embeddings (and layers, for the hidden modes) are used.
        prompts: per gated expert, in router-row order.
        mode: one of `PROMPT_MODES`.
        mode_key: where the step names the mode (for errors), within the step.
        prompt_key: expert index -> where the step lists its positive prompts (default
            ``experts[i].positive_prompts``).

    Returns:
        ``len(prompts)`` rows per layer: `CheapEmbedGates` (one node, every layer) or
        `GateRows` of one shared `HiddenGates` sweep.

    Raises:
        RecipeError: an unknown mode, an expert without positive prompts, a base without
            tokenizer.json or embeddings, a prompt token outside the embedding table, a family
            or config the forward does not compute (hidden modes).

    Example:
        >>> nodes = prompt_gate_nodes(step, recipe, base, [ExpertPrompts(("def f():",))],
        ...                           "hidden")  # doctest: +SKIP
    """
    where = prompt_key or (lambda i: ("experts", i, "positive_prompts"))
    at = step.key_path
    if not prompts:
        raise recipe.error(at, f"gate mode '{mode}' needs at least one expert with prompts")
    if mode not in PROMPT_MODES:
        raise recipe.error(at + mode_key, f"gate mode '{mode}' is not computed from prompts",
                           hint=f"use one of {', '.join(PROMPT_MODES)}")
    for i, p in enumerate(prompts):
        if not p.positive or not any(s for s in p.positive):
            raise recipe.error(at + where(i), f"expert {i} has no positive prompts; gate mode "
                               f"'{mode}' sets its router row from them",
                               hint="list prompts that should reach this expert")
    tok = step.files.get(TOKENIZER_KEY)
    if tok is None:
        raise recipe.error(at + ("base",), f"no tokenizer found for the base model of step "
                           f"'{step.name}' (gate mode '{mode}' tokenises prompts)",
                           hint="the base must lead to a model input saved with tokenizer.json")
    try:
        files: TokenizerFiles = tok.value()
    except UnlocatedError as e:  # the side file's problem (TokenizerFileError)
        raise recipe.error(at + ("base",), e.message, hint=e.hint) from None
    embed = _embedding(base)
    if embed is None:
        raise recipe.error(at + ("base",), f"base '{base.name}' has no "
                           "`model.embed_tokens.weight`, which prompt gates read")
    lists: list[tuple[str, ...]] = []
    experts = []
    for p in prompts:
        pos = _index(lists, p.positive)
        experts.append((pos, _index(lists, p.negative) if p.negative else -1))
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(files.text)
    except Exception as e:  # tokenizers raises its own Exception for a malformed file
        raise recipe.error(at + ("base",), f"the base model '{files.model}''s tokenizer.json "
                           f"cannot be loaded: {e}") from None
    batches = tuple(tokenize_prompts(tokenizer, files.bos_token, ps) for ps in lists)
    pad = _pad_id(tokenizer, files)
    vocab = embed.shape[0]
    for li, (b, ps) in enumerate(zip(batches, lists, strict=True)):
        for ids, text in zip(b, ps, strict=True):
            if not ids:
                user = next(i for i, e in enumerate(experts) if li in e)
                raise recipe.error(at + where(user), f"prompt {text!r} tokenises to no tokens "
                                   "(the base's tokenizer has no BOS token to prepend)",
                                   hint="write a non-empty prompt")
            if max(ids) >= vocab or (pad is not None and pad >= vocab):
                raise recipe.error(at + ("base",), f"prompt {text!r} tokenises to ids "
                                   f"{list(ids)[:8]} outside the base's embedding table "
                                   f"({vocab} rows)", hint="the tokenizer.json must be the "
                                   "base model's own")
    pad_id = pad if pad is not None else 0
    layers = base.stack.num_layers
    if mode == "cheap_embed":
        node = intern(CheapEmbedGates(embed, batches, tuple(experts), pad_id))
        return [node] * layers
    spec = forward_spec(base.config)
    if isinstance(spec, str):
        raise recipe.error(at + mode_key, f"gate mode '{mode}' runs the base '{base.name}' "
                           f"layer by layer, and the forward cannot compute its {spec}",
                           hint="use `cheap_embed` or `random` for this base")
    by_layer = base.layer_tensors()
    names, weights = [], []
    for layer in range(layers - 1):
        have = by_layer.get(layer, {})
        missing = [n for n in LAYER_WEIGHTS if n not in have]
        if missing:
            raise recipe.error(at + ("base",), f"base '{base.name}' layer {layer} lacks "
                               f"{', '.join(missing)}, which the forward reads")
        layer_names = tuple(n for n in LAYER_WEIGHTS + OPTIONAL_WEIGHTS if n in have)
        names.append(layer_names)
        weights.extend(have[n] for n in layer_names)
    sweep = intern(HiddenGates(embed, tuple(weights), tuple(names), batches, tuple(experts),
                               pad_id, spec, layers, mode == "hidden_avg"))
    return [intern(GateRows(sweep, layer)) for layer in range(layers)]


def prompt_gates_meta(step: Step) -> dict[str, Any]:
    """What `op: moe` records of the tokenizer in its model's ``meta`` (the manifest's operator
    metadata, which the plan hash covers): the prompts are in the recipe, but their token ids
    depend on the base's tokenizer.json, which is not among the inputs' identities. Empty
    when the step has no readable tokenizer."""
    side = step.files.get(TOKENIZER_KEY)
    if side is None or side.problem is not None:
        return {}
    files: TokenizerFiles = side.value()
    return {"tokenizer": {"model": files.model, "sha256": files.sha256}}


def _embedding(base: VirtualModel) -> Node | None:
    """The base's token embedding table: ``embed_tokens.weight`` beside its layer stack
    (``model.`` for the families here; mergekit reads ``model.embed_tokens.weight``)."""
    prefix = base.stack.prefix
    beside = prefix[:-len("layers.")] if prefix.endswith("layers.") else base.stack.base
    for name in (f"{beside}embed_tokens.weight", f"{base.stack.base}embed_tokens.weight"):
        node = base.tensors.get(name)
        if node is not None and len(node.shape) == 2:
            return node
    return None


def _index(lists: list[tuple[str, ...]], prompts: tuple[str, ...]) -> int:
    """The batch of ``prompts`` (equal lists share one forward)."""
    if prompts not in lists:
        lists.append(prompts)
    return lists.index(prompts)


def _pad_id(tok: Any, files: TokenizerFiles) -> int | None:
    """mergekit's pad: the BOS token's id, else the EOS token's."""
    for text in (files.bos_token, files.eos_token):
        if text is not None and tok.token_to_id(text) is not None:
            return tok.token_to_id(text)
    return None

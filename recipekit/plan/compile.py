"""Compile a recipe into a plan: every step built in dependency order, then the output.

``compile_plan`` turns models into virtual models, runs each step's builder, applies the output
dtype and the donor's config, and lays the output tensors into shards (`schedule`) whose
safetensors headers are fixed before any byte is read. Everything here is shapes and dtypes:
no torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from recipekit import __version__
from recipekit.arch import LayerStack, config_get, config_has, with_config, without_config_keys
from recipekit.dtypes import CODE_TO_NAME, NAME_TO_CODE, is_floating
from recipekit.errors import RecipeErrors, RecipekitError
from recipekit.graph import Load, Node, VirtualModel, expression_nodes, load, round_to
from recipekit.inputs.chat_template import ChatTemplate
from recipekit.inputs.models import (
    Checkpoint,
    donor_files_identity,
    iter_donor_files,
    read_donor_json,
)
from recipekit.inputs.resolve import Sources
from recipekit.inputs.side_files import resolve_side_files
from recipekit.io.names import ADAPTER_WEIGHTS, is_absolute_local
from recipekit.plan.cost import (
    COPY_BUFFERS,
    COPY_CHUNK,
    computing_bytes,
    held_nodes,
    kept_heap,
    kept_read_bytes,
    piece_workers,
    reads_whole_tensor,
    retained_bytes,
    shared_values,
    stream_loads,
    working_set,
)
from recipekit.plan.overlap import check_plan_output
from recipekit.plan.schedule import Shard, schedule_shards
from recipekit.recipe import Recipe, step_references
from recipekit.steps import OPS


@dataclass(frozen=True)
class Plan:
    """Everything the executor needs, and everything `recipekit plan` shows."""

    recipe: Recipe
    sources: Mapping[str, Any]  # Checkpoint or AdapterCheckpoint, by recipe name
    model: VirtualModel
    donor: Checkpoint | None  # None for an adapter-set output
    config: dict[str, Any]  # config.json, or adapter_config.json for an adapter output
    shards: tuple[Shard, ...]
    adapter: bool = False  # the output is a PEFT adapter directory
    #: Step name -> operator metadata (coalescing schemes, compensation), for the manifest.
    operators: Mapping[str, Any] = field(default_factory=dict)
    #: Files written with planned contents (relative path -> bytes): donor files rewritten
    #: (e.g. the sentence-transformers pooling dimension after a width change) or new ones
    #: (an aligned vocabulary's tokenizer, chat_template.jinja); None: a donor file the output
    #: does not get (a stale slow tokenizer, the donor's other chat templates).
    files: Mapping[str, bytes | None] = field(default_factory=dict)
    #: The output's chat template (`output.chat_template`), None when the donor's files stand.
    chat_template: ChatTemplate | None = None

    @property
    def bytes_written(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def num_tensors(self) -> int:
        return sum(len(s.tensors) for s in self.shards)

    def loads(self) -> set[Load]:
        """Every distinct stored tensor the plan reads."""
        return {n for s in self.shards for t in s.tensors for n in expression_nodes(t.node)
                if isinstance(n, Load)}

    @property
    def bytes_read(self) -> int:
        """Distinct input bytes the plan reads."""
        return sum(n.nbytes for n in self.loads())

    @property
    def bytes_read_total(self) -> int:
        """Input bytes read including re-reads (a layer used twice is read twice, and a
        reduction that streams from the files reads its inputs once per pass, `passes`)."""
        total = 0
        swept: set[Node] = set()  # a sweep's value is shared by the tensors that follow
        for s in self.shards:
            for t in s.tensors:
                total += sum(n.nbytes for n in _reached(t.node, swept) if isinstance(n, Load))
                for r in held_nodes(t.node)[1]:
                    total += r.passes * sum(n.nbytes for n in stream_loads(r) or ())
        return total

    def peak_memory_estimate(self) -> int:
        """Working set above an idle process: the copy buffers if any tensor is copied as is,
        the reduction values the executor keeps for later tensors (`retained_bytes`), the
        buffers the reader keeps for whole reads (`io.reader.KEEP_BYTES`), the free heap kept
        between tensors computed in pieces (`kept_heap`), plus the largest computed tensor's
        working set with the next tensor's whole inputs read ahead (`computing_bytes`, with
        this machine's default `piece_workers`)."""
        copied = [t.nbytes for s in self.shards for t in s.tensors if isinstance(t.node, Load)]
        buffers = COPY_BUFFERS * min(COPY_CHUNK, max(copied)) if copied else 0
        workers = piece_workers()
        computed = [t.node for s in self.shards for t in s.tensors if not isinstance(t.node, Load)]
        kept = retained_bytes(shared_values(computed))
        heap = kept_heap(computed, workers)
        return (buffers + kept + heap + kept_read_bytes(computed)
                + max((computing_bytes([t.node for t in s.tensors], workers)
                       for s in self.shards), default=0))

    def largest_whole_tensor_op(self) -> tuple[str, Node, int] | None:
        """(tensor name, node, working set) of the computed tensor that needs the most memory
        because its op reads the whole tensor at once (slerp norms, TIES thresholds, ...);
        None when every computed tensor runs in chunks."""
        worst = None
        for s in self.shards:
            for t in s.tensors:
                if not reads_whole_tensor(t.node):
                    continue
                ws = working_set(t.node)
                if worst is None or ws > worst[2]:
                    worst = (t.name, t.node, ws)
        return worst

    def plan_hash(self) -> str:
        """Identity of what this plan writes: canonical recipe, input identities, tool version."""
        doc = {
            "recipe": self.recipe.canonical(),
            "inputs": {n: c.identity() for n, c in sorted(self.sources.items())},
            "version": __version__,
        }
        if self.files:  # rewritten or made files (a built tokenizer) are written as such
            doc["files"] = {rel: None if data is None else hashlib.sha256(data).hexdigest()
                            for rel, data in sorted(self.files.items())}
        if self.operators:  # a scheme read from a file is part of what is written
            doc["operators"] = self.operators
        if self.chat_template is not None:  # a file's or the inputs' template, by content
            doc["chat_template"] = {"source": self.chat_template.source, "sha256": hashlib.sha256(
                self.chat_template.text.encode()).hexdigest()}
        donor = self.donor
        if donor is not None and donor.hub is None and donor.remote is None and \
                not self.adapter:
            # the donor's other files are copied into the output (a hub donor's commit, or a
            # URL donor's object ETags, fix them)
            files = donor_files_identity(donor.path)
            if files:
                doc["donor_files"] = files
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _reached(node: Node, swept: set[Node]) -> set[Node]:
    """``node``'s expression, without the inputs of sweeps already in ``swept`` (which it
    then records): the executor computes a sweep once for the tensors that share it."""
    from recipekit.graph.passes import Sweep

    seen: set[Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if isinstance(n, Sweep):
            if n in swept:
                continue
            swept.add(n)
        stack.extend(n.inputs)
    return seen


def model_from_checkpoint(ckpt: Checkpoint) -> VirtualModel:
    tensors = {name: load(ckpt.name, name, info.shape, info.dtype)
               for name, info in ckpt.tensors.items()}
    return VirtualModel(ckpt.name, ckpt.config, tensors, ckpt.stack, ckpt.name,
                        stored=ckpt.tensors)


def compile_plan(recipe: Recipe, sources: Mapping[str, Any]) -> Plan:
    """Build every step, then the output: cast, order, shard, header.

    Raises:
        RecipeErrors: every step problem found (steps whose inputs failed are skipped).
        OutputPathError: the output path is, lies inside or contains an input.
    """
    from recipekit.graph.adapterset import AdapterSet

    models = _build_models(recipe, sources)
    value = models[recipe.output.model]
    if isinstance(value, AdapterSet):
        plan = _adapter_plan(recipe, sources, value)
    elif recipe.output.adapter is not None:
        raise RecipeErrors([recipe.error(("output", "adapter"), f"output '{value.name}' is a "
                                         "model, not an adapter set", key=True,
                                         hint="`output.adapter` applies when `output.model` "
                                         "names an adapter set")])
    else:
        plan = _model_plan(recipe, sources, models, value)
    check_plan_output(plan)  # before anything is created or deleted, --force or not
    return plan


def _build_models(recipe: Recipe, sources: Mapping[str, Any]) -> dict[str, Any]:
    """Every input and step as a virtual model or adapter set, by name.

    Raises:
        RecipeErrors: every problem found; a step whose inputs failed is skipped.
    """
    from recipekit.graph.adapterset import AdapterSet, read_adapter_set
    from recipekit.inputs.adapters import AdapterCheckpoint

    models: dict[str, VirtualModel | AdapterSet] = {}
    errors: list[RecipekitError] = []
    failed: set[str] = set()
    side: dict[str, dict[Any, Any]] = {}  # step name -> key path -> SideFile
    tokenizers: dict[str, Any] | None = None  # model name -> ModelTokenizer, read once
    found = getattr(sources, "side_files", None)
    for (step_name, key), f in (resolve_side_files(recipe) if found is None else found).items():
        side.setdefault(step_name, {})[key] = f
    for n, c in sources.items():
        try:
            models[n] = (read_adapter_set(c, recipe) if isinstance(c, AdapterCheckpoint)
                         else model_from_checkpoint(c))
        except RecipeErrors as e:
            errors.extend(e.errors)
            failed.add(n)
    for step in recipe.steps.values():
        if any(ref in failed for ref, _ in step_references(step.spec)):
            failed.add(step.name)
            continue
        op = OPS[step.op]
        wrong = [recipe.error(step.key_path + rel, f"'{ref}' is an adapter set; op "
                              f"{step.op} takes models here", hint="fold adapters into a model "
                              "first with `op: adapters`")
                 for ref, rel in step_references(step.spec) if rel[0] != "adapters"
                 and op.models_only and isinstance(models.get(ref), AdapterSet)]
        if wrong:
            errors.extend(wrong)
            failed.add(step.name)
            continue
        files = side.get(step.name, {})
        if "tokenizer" in step.spec:  # vocabulary alignment reads the models' tokenizers
            from recipekit.inputs.tokenizers import read_tokenizers

            if tokenizers is None:
                tokenizers = read_tokenizers(sources)
            files = {**files, **{("tokenizer", n): t for n, t in tokenizers.items()}}
        try:
            models[step.name] = op.build(replace(step, files=files), models, recipe)
        except RecipeErrors as e:
            errors.extend(e.errors)
            failed.add(step.name)
        except RecipekitError as e:
            errors.append(e)
            failed.add(step.name)
    if errors:
        raise RecipeErrors(errors)
    return models


def _kept(sources: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``sources`` for the plan, `Sources.side_files` included: the lock check of
    `run` compares them (a plain dict lost the MoE tokenizer `recipekit lock` had pinned, and
    every run of a locked prompt-gated recipe was refused; found by a black-box check)."""
    if isinstance(sources, Sources):
        return Sources(dict(sources), dict(sources.side_files))
    return dict(sources)


def _model_plan(recipe: Recipe, sources: Mapping[str, Any], models: Mapping[str, Any],
                model: VirtualModel) -> Plan:
    """A plan writing ``model`` as a checkpoint: output dtype, donor config and files, shards."""
    # run/finish imports run/manifest, which imports this package: import it once it is loaded.
    from recipekit.plan.chat_template import (
        other_template_files,
        output_chat_template,
        with_chat_template,
    )
    from recipekit.run.finish import rewrite_dimension_files

    out_code = NAME_TO_CODE[recipe.output.dtype] if recipe.output.dtype else None
    tensors: dict[str, Node] = {}
    for name, node in model.tensors.items():
        # round once to the output dtype (a computed node is not first rounded to its own)
        tensors[name] = round_to(node, out_code) if out_code and is_floating(node.dtype) else node

    donor_name = recipe.output.config or model.donor
    if donor_name not in sources:
        donor_name = models[donor_name].donor
    donor = sources[donor_name]
    config = output_config(donor.config, model, tensors, recipe.output.dtype)
    if recipe.output.config is not None:
        check_config_vocab(recipe, sources, model, config)
    shards = schedule_shards(tensors, recipe.output.shard_size)
    final = VirtualModel(model.name, model.config, tensors, model.stack, donor_name, model.changed)
    operators = {name: dict(m.meta) for name in recipe.steps  # adapter sets have no meta
                 if isinstance(m := models[name], VirtualModel) and m.meta}
    files = rewrite_dimension_files(donor, config)
    vocab = vocab_files(recipe, models, model.name)
    if vocab and recipe.output.config is not None:  # the donor's ids name the donor's tokens
        config, vocab = _config_donor_ids(config, donor, donor_name, vocab)
    if vocab:  # an aligned vocabulary: its tokenizer and its template, not the donor's
        from recipekit.steps.vocab import STALE_FILES

        others = other_template_files(iter_donor_files(donor.path, warn=False))
        files = {**files, **dict.fromkeys(STALE_FILES), **dict.fromkeys(others), **vocab}
    template = output_chat_template(recipe, sources)
    files = with_chat_template(files, donor, template)  # last: over any tokenizer file planned
    return Plan(recipe, _kept(sources), final, donor, config, shards, operators=operators,
                files=files, chat_template=template)


def _config_donor_ids(config: dict[str, Any], donor: Any, name: str,
                      vocab: dict[str, bytes | None]
                      ) -> tuple[dict[str, Any], dict[str, bytes | None]]:
    """`steps.vocab.follow_config_donor` for `output.config`'s donor ``name``: its token ids
    (config.json, generation_config.json) mapped through its own tokenizer."""
    from recipekit.inputs.tokenizers import TokenizerError, read_model_tokenizer
    from recipekit.io.names import GENERATION_CONFIG
    from recipekit.steps.vocab import follow_config_donor

    try:
        tok = read_model_tokenizer(name, Path(donor.path))
    except (TokenizerError, OSError):
        tok = None
    path = Path(donor.path) / GENERATION_CONFIG
    generation = read_donor_json(Path(donor.path), Path(GENERATION_CONFIG)) \
        if path.is_file() else None
    config, written = follow_config_donor(config, donor.config, generation, tok, vocab, name)
    return config, {**vocab, GENERATION_CONFIG: written}


def check_config_vocab(recipe: Recipe, sources: Mapping[str, Any], model: VirtualModel,
                       config: Mapping[str, Any]) -> None:
    """`output.config`'s donor gives config.json and, unless a step aligned the vocabulary,
    the tokenizer: its vocab size must be the rows of the output's vocabulary tables, or
    transformers refuses the checkpoint (or encodes tokens past the table).

    Raises:
        RecipeErrors: located at `output.config`, naming both sizes and the fix.
    """
    from recipekit.arch import load_architectures

    rows = vocab_rows(model)
    arch = load_architectures().get(model.stack.family or "")
    key = model.stack.count_key[:-1] + (arch.config.get("vocab_size", "vocab_size")
                                        if arch else "vocab_size",)
    size = config_get(config, key) if config_has(config, key) else None
    if rows is None or not isinstance(size, int) or isinstance(size, bool) or size == rows:
        return
    name = recipe.output.config
    fits = [n for n, c in sources.items() if isinstance(getattr(c, "config", None), Mapping)
            and n != name and config_has(c.config, key) and config_get(c.config, key) == rows]
    hint = (f"name a model whose vocabulary has {rows} rows in `output.config`"
            + (f" ({', '.join(fits)})" if fits else "") + ", or leave it out; for the tokenizer "
            f"of '{name}', align the vocabularies in a `merge` or `interpolate` step with "
            f"`tokenizer: {name}`")
    raise RecipeErrors([recipe.error(
        ("output", "config"), f"'{name}' has a vocabulary of {size} tokens (config.json "
        f"`{key[-1]}`; its tokenizer comes with it), but the output's vocabulary tables "
        f"(embeddings, LM head) have {rows} rows: transformers would not load the output",
        hint=hint)])


def vocab_rows(model: VirtualModel) -> int | None:
    """The rows of the model's first vocabulary table (token embeddings), None without one."""
    from recipekit.arch import family_names

    names = family_names(model.stack.family, "vocabulary_tensors")
    for n, node in model.tensors.items():
        if n.endswith(names) and node.shape:
            return int(node.shape[0])
    return None


def vocab_files(recipe: Recipe, models: Mapping[str, Any], name: str
                ) -> dict[str, bytes | None]:
    """The files (the tokenizer) of the nearest step before ``name`` that made some: an
    aligned vocabulary (steps/vocab.py), searched breadth first, first input first."""
    queue, seen = [name], set()
    while queue:
        n = queue.pop(0)
        if n in seen:
            continue
        seen.add(n)
        files = getattr(models.get(n), "files", None)
        if files:
            return dict(files)
        if n in recipe.steps:
            queue += [ref for ref, _ in step_references(recipe.steps[n].spec)]
    return {}


#: The layer stack of an adapter output (it has no layers of its own).
NO_STACK = LayerStack("", 0, ("num_hidden_layers",), (), None, "")


def _adapter_plan(recipe: Recipe, sources: Mapping[str, Any], aset: Any) -> Plan:
    """A plan writing an adapter set as a PEFT adapter directory: one safetensors file."""
    from recipekit.run.adapter_output import adapter_output

    if recipe.output.config is not None:
        raise RecipeErrors([recipe.error(("output", "config"), "an adapter output has no "
                                         "config.json donor", key=True)])
    if recipe.output.chat_template is not None:
        raise RecipeErrors([recipe.error(
            ("output", "chat_template"), "an adapter output has no tokenizer to carry a chat "
            "template", key=True, hint="set it where the adapters are folded into a model "
            "(`op: adapters`), or put chat_template.jinja beside the base model")])
    tensors, config = adapter_output(aset, recipe)
    shards = schedule_shards(tensors, 1 << 62, single=ADAPTER_WEIGHTS)
    model = VirtualModel(aset.name, {}, tensors, NO_STACK, "")
    return Plan(recipe, _kept(sources), model, None, config, shards, adapter=True)


def output_config(donor: Mapping[str, Any], model: VirtualModel, tensors: Mapping[str, Node],
                  dtype: str | None) -> dict[str, Any]:
    """The donor's config with the keys the steps changed (set, or removed where the model's
    config lacks them), and both `dtype` and `torch_dtype` naming what was written
    (transformers 5 reads `dtype`, older versions `torch_dtype`)."""
    kept = [k for k in model.changed if config_has(model.config, k)]
    config = with_config(donor, {k: config_get(model.config, k) for k in kept})
    config = without_config_keys(config, [k for k in model.changed if k not in kept])
    if dtype is None:
        floats = {n.dtype for n in tensors.values() if is_floating(n.dtype)}
        dtype = CODE_TO_NAME.get(next(iter(floats))) if len(floats) == 1 else None
    if dtype is None:
        dtype = donor.get("dtype") or donor.get("torch_dtype")
    if dtype is not None:
        config["dtype"] = dtype
        config["torch_dtype"] = dtype
    if is_absolute_local(config.get("_name_or_path")):
        del config["_name_or_path"]  # where the donor was loaded from: nothing to publish
    return config

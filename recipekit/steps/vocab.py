"""Vocabulary alignment for the steps that combine models (`merge`, `interpolate`): `tokenizer:`.

Why: fine-tunes that added a few tokens (ChatML specials, a pad token) have embedding and
LM-head tables of other sizes and other token ids; merging them row by row would mix unrelated
tokens. With ``tokenizer:`` a step first builds the output vocabulary (steps/vocab_build.py,
mergekit 0.1.5's rules) and permutes every input's vocabulary tables into it with row gathers
(graph/gather.py) that read row pieces from the files; the merge then sees aligned tables.
The step's config gets the new `vocab_size` and its `files` the output tokenizer
(`tokenizer.json` checked with the `tokenizers` library, `tokenizer_config.json` with its
`added_tokens_decoder`, `special_tokens_map.json`, the source tokenizer's chat template, and
`generation_config.json` with token ids mapped into the output vocabulary).

Recipe spelling (schema `$defs/tokenizer`)::

    tokenizer: union                 # or base, or one of the step's models
    tokenizer:
      source: union                  # default union
      tokens:                        # optional per-token sources
        <|im_start|>: chatml         # that model's row where a model lacks the token
        _tok_10: {model: chatml, force: true}       # every model takes it
        _tok_20: {model: chatml, token_id: 64}      # row 64 of chatml
        _tok_21: {model: base, token: "<s>"}        # chatml's row of `<s>`
        _tok_22: zero                # zeros
      pad_to_multiple_of: 64         # padding rows: the mean of the real rows

Oracle: tests/steps/test_vocab.py (mergekit 0.1.5 on the configs of its test_tokenizer.py;
transformers loading a union merge of two tiny Llamas).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from recipekit.arch import family_names, load_architectures, with_config
from recipekit.dtypes import promote
from recipekit.errors import RecipeError, RecipeErrors
from recipekit.graph import Node, VirtualModel, cast, intern
from recipekit.graph.gather import GatherRows, RowMean, segments_of
from recipekit.inputs.tokenizer_file import token_text
from recipekit.inputs.tokenizers import ModelTokenizer, TokenizerError, token_map
from recipekit.io.names import (
    CHAT_TEMPLATE,
    GENERATION_CONFIG,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
)
from recipekit.io.output import dumps
from recipekit.recipe import Recipe, Step
from recipekit.steps.vocab_build import OutputVocab, TokenRule, build_vocab, row_sources

log = logging.getLogger(__name__)

#: Donor files that describe the old vocabulary (slow-tokenizer files): not copied into an
#: output whose vocabulary was aligned.
STALE_FILES = ("tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
               "spiece.model", "sentencepiece.bpe.model")
#: config/generation-config keys holding token ids, remapped through the output vocabulary.
ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def parse_rules(step: Step, recipe: Recipe, names: Sequence[str], base: str | None
                ) -> tuple[str, dict[str, TokenRule], int | None]:
    """(source, per-token rules, pad_to_multiple_of) from the step's `tokenizer:`; ``base``:
    the model the keyword `base` names (the step's base, else its first model).

    Raises:
        RecipeErrors: a source or a rule naming no model of the step, or a keyword source
            that is also the name of another of its models.
    """
    spec = step.spec["tokenizer"]
    path = step.key_path + ("tokenizer",)
    if isinstance(spec, str):
        spec = {"source": spec}
        where = path
    else:
        where = path + ("source",)
    errors: list[RecipeError] = []
    source = spec.get("source", "union")
    if source in ("union", "base") and source in names and (source, base) != ("base", "base"):
        # the keyword wins, silently, over the model the user may have meant (found by a
        # black-box check: README's own examples name a model `base`)
        meant = "every model's tokens" if source == "union" else f"model '{base}'s tokenizer"
        if source in recipe.steps:  # an earlier step's result, named like the keyword
            errors.append(recipe.error(where, f"tokenizer source '{source}' is a keyword "
                                       f"({meant}) and also the name of the step '{source}' "
                                       "this step merges", hint=f"rename step '{source}' (its "
                                       "`name:` and where it is used) to take its tokenizer, "
                                       "or write the keyword's model by name"))
        else:
            errors.append(recipe.error(where, f"tokenizer source '{source}' is a keyword "
                                       f"({meant}) and also the name of one of this step's "
                                       f"models", hint=f"rename model '{source}' in `models:` "
                                       "to take its tokenizer, or write the keyword's model by "
                                       "name"))
    elif source not in ("union", "base") and source not in names:
        errors.append(recipe.error(where, f"tokenizer source '{source}' is not one of this "
                                   "step's models", hint="use union, base or one of: "
                                   + ", ".join(names)))
    rules: dict[str, TokenRule] = {}
    for token, value in (spec.get("tokens") or {}).items():
        at = path + ("tokens", token)
        if value == "zero":
            rules[token] = TokenRule(zero=True)
            continue
        if isinstance(value, str):
            value = {"model": value}
        model = value.get("model")
        if value.get("zero"):
            rules[token] = TokenRule(zero=True, force=bool(value.get("force", False)))
            continue
        if model not in names:
            errors.append(recipe.error(at, f"'{model}' is not one of this step's models",
                                       hint="models: " + ", ".join(names)))
            continue
        rules[token] = TokenRule(model, value.get("token"), value.get("token_id"),
                                 force=bool(value.get("force", False)))
    if errors:
        raise RecipeErrors(errors)
    return source, rules, spec.get("pad_to_multiple_of")


def check_tokenizer(step: Step, recipe: Recipe, names: Sequence[str], base: str | None
                    ) -> list[RecipeError]:
    """The step's `tokenizer:` names only its own models: the document check of `merge` and
    `interpolate` (so `validate --no-inputs` finds it). ``base``: as `parse_rules`."""
    if "tokenizer" not in step.spec:
        return []
    try:
        parse_rules(step, recipe, names, base)
    except RecipeErrors as e:
        return list(e.errors)  # type: ignore[arg-type]
    return []


def _tokenizer(step: Step, vm: VirtualModel) -> ModelTokenizer:
    """The tokenizer of one input: an aligned step's own, else its donor model's."""
    if TOKENIZER_JSON in vm.files:
        return _built_tokenizer(vm.name, vm.files)
    found = step.files.get(("tokenizer", vm.donor))
    if found is None:
        raise TokenizerError(f"model '{vm.name}' has no tokenizer files to align")
    if isinstance(found, TokenizerError):
        raise found
    return found


def _built_tokenizer(name: str, files: Mapping[str, bytes | None]) -> ModelTokenizer:
    """The tokenizer an aligning step built (its planned files: tokenizer.json, and its
    tokenizer_config.json and chat template when it has them)."""
    data = json.loads(files[TOKENIZER_JSON] or b"{}")
    raw = files.get(TOKENIZER_CONFIG)
    return ModelTokenizer(name, data, json.loads(raw) if raw else None, None, None,
                          token_map(data), files.get(CHAT_TEMPLATE))


def align_inputs(step: Step, names: Sequence[str], models: Mapping[str, VirtualModel],
                 recipe: Recipe, base: str | None) -> tuple[dict[str, VirtualModel], int,
                                                            dict[str, bytes | None],
                                                            dict[str, Any]]:
    """The step's inputs with their vocabulary tables permuted into the output vocabulary.

    Args:
        names: the step's models in merge order (mergekit: the `models:` list, base last).
        base: the model whose row a shared token takes (the step's base), or None.

    Returns:
        (the aligned inputs by name, the output's table rows, the output tokenizer files, the
        donor config's token ids mapped into the output vocabulary).

    Raises:
        RecipeErrors: located at the step's `tokenizer:` key.
    """
    path = step.key_path + ("tokenizer",)
    tok_base = base if base is not None else names[0]
    source, rules, pad = parse_rules(step, recipe, names, tok_base)
    first = models[names[0]]
    vocab_names = family_names(first.stack.family, "vocabulary_tensors")
    tables = [n for n in first.tensors if n.endswith(vocab_names) and first.tensors[n].shape]
    if not tables:
        raise RecipeErrors([recipe.error(path, "these models have no vocabulary tables "
                                         "(embeddings, LM head) to align", key=True)])
    try:
        toks = {m: _tokenizer(step, models[m]) for m in names}
        sizes = {m: models[m].tensors[tables[0]].shape[0] if tables[0] in models[m].tensors
                 else 0 for m in names}
        out = build_vocab(source if source != "base" else "base", tok_base, names, toks, sizes,
                          list(rules))
        rows, missing = row_sources(out, names, base, rules, toks)
    except TokenizerError as e:
        raise RecipeErrors([recipe.error(path, str(e))]) from None
    for token in missing:
        log.warning("step '%s': token %r is in no model: its rows are zeros", step.name, token)
    size = out.size
    total = -(-size // pad) * pad if pad else size
    aligned = {m: _aligned_model(models[m], names, models, tables, rows[m], size, total,
                                 step, recipe) for m in names}
    donor = names[0] if base is None else base
    start = toks[tok_base if source in ("union", "base") else source]
    files = output_files(out, start, toks[donor], step, recipe)
    old = {i: t for t, i in toks[donor].vocab.items()}
    new = {t: i for i, t in enumerate(out.tokens)}
    config = models[donor].config
    remapped = _ids_remapped(config, old, new, _role_ids(start, new),
                             f"step '{step.name}': config.json")
    ids = {k: v for k, v in remapped.items() if k in ID_KEYS and v != config.get(k)}
    return aligned, total, files, ids


def _aligned_model(vm: VirtualModel, names: Sequence[str], models: Mapping[str, VirtualModel],
                   tables: list[str], rows: list[tuple[tuple[str, int], ...]], size: int,
                   total: int, step: Step, recipe: Recipe) -> VirtualModel:
    index = {m: i for i, m in enumerate(names)}
    tensors = dict(vm.tensors)
    for name in tables:
        inputs = tuple(models[m].tensors.get(name) for m in names)
        if any(t is None for t in inputs) or len({t.shape[1:] for t in inputs}) > 1:  # type: ignore[union-attr]
            continue  # the merge reports the mismatch (check_aligned)
        nodes: tuple[Node, ...] = inputs  # type: ignore[assignment]
        for m, r in ((m, r) for srcs in rows for m, r in srcs):
            if r >= nodes[index[m]].shape[0]:
                raise RecipeErrors([recipe.error(step.key_path + ("tokenizer",),
                                   f"row {r} is beyond `{name}` of '{m}' "
                                   f"({nodes[index[m]].shape[0]} rows)")])
        dtype = promote([n.dtype for n in nodes])
        segments = segments_of([tuple((index[m], r) for m, r in srcs) for srcs in rows])
        own = index.get(vm.name, -1)
        node = tensors[name]
        if (segments == ((0, size, ((own, 0),)),) and size == total == node.shape[0]):
            tensors[name] = cast(node, dtype)  # already the output vocabulary
            continue
        real = intern(GatherRows(nodes, segments, size, dtype))
        if total > size:
            fill = intern(RowMean(real))
            tensors[name] = intern(GatherRows(nodes, segments + ((size, total, None),), total,
                                              dtype, fill))
        else:
            tensors[name] = real
    return VirtualModel(vm.name, vm.config, tensors, vm.stack, vm.donor, vm.changed)


def vocab_config(vm: VirtualModel, total: int, ids: Mapping[str, Any]
                 ) -> tuple[dict[str, Any], frozenset[Any]]:
    """The step's config with the output's vocab size and token ids (``ids``: the donor's
    `bos_token_id`, ... mapped through the tokens, where they moved), and the keys changed."""
    arch = load_architectures().get(vm.stack.family or "")
    key = (arch.config.get("vocab_size", "vocab_size") if arch else "vocab_size",)
    updates = {key: total, **{(k,): v for k, v in ids.items()}}
    return with_config(vm.config, updates), vm.changed | set(updates)


#: The tokenizer role of each id key (tokenizer_config.json / special_tokens_map.json).
ROLES = {"bos_token_id": "bos_token", "eos_token_id": "eos_token", "pad_token_id": "pad_token"}


def _role_ids(tok: ModelTokenizer, new: Mapping[str, int]) -> dict[str, int]:
    """The output ids of ``tok``'s own special tokens, by id key (``eos_token_id``: its
    ``eos_token``), from its tokenizer_config.json, else its special_tokens_map.json."""
    out: dict[str, int] = {}
    for key, role in ROLES.items():
        for doc in (tok.config, tok.special_map):
            value = token_text((doc or {}).get(role))
            if value is not None and value in new:
                out[key] = new[value]
                break
    return out


def _ids_remapped(doc: Mapping[str, Any], old: Mapping[int, str], new: Mapping[str, int],
                  own: Mapping[str, int], where: str) -> dict[str, Any]:
    """``doc`` with its token ids (`ID_KEYS`) mapped from the donor's tokens (``old``: id →
    token) to the output's (``new``: token → id). A donor token the output lacks takes the
    tokenizer source's own id for that role (``own``), else keeps its id with a warning
    (``where`` names the file): never silently another token's id."""
    out = dict(doc)
    for key in ID_KEYS:
        value = out.get(key)
        ids = value if isinstance(value, list) else [value]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            continue
        mapped = []
        for i in ids:
            token = old.get(i)
            if token is None:  # no token of the donor's: kept as written
                mapped.append(i)
            elif token in new:
                mapped.append(new[token])
            elif key in own:
                mapped.append(own[key])
            else:
                role = ROLES.get(key)
                log.warning("%s `%s` %d is the donor's token %r, which the output vocabulary "
                            "lacks%s: left as %d; set `%s` by hand", where, key, i, token,
                            f", and the tokenizer source has no {role}" if role else "", i, key)
                mapped.append(i)
        # a list (several eos ids) may now name one token twice
        out[key] = list(dict.fromkeys(mapped)) if isinstance(value, list) else mapped[0]
    return out


def output_files(out: OutputVocab, start: ModelTokenizer, donor: ModelTokenizer, step: Step,
                 recipe: Recipe) -> dict[str, bytes | None]:
    """The output tokenizer files, consistent with each other: tokenizer.json (checked by
    loading it with `tokenizers`), tokenizer_config.json's added_tokens_decoder, the special
    tokens map and the chat template of ``start`` (the tokenizer source), and
    generation_config.json with its token ids mapped through the tokens.

    Raises:
        RecipeErrors: `tokenizers` cannot load the result or gives other ids.
    """
    text = json.dumps(out.data, indent=2, ensure_ascii=False) + "\n"
    _check_with_tokenizers(text, out, step, recipe)
    files: dict[str, bytes | None] = {TOKENIZER_JSON: text.encode()}
    # a source without tokenizer_config.json gets a minimal one: the donor's describes another
    # tokenizer (its special tokens, its chat template) and must not be copied beside this one
    config = dict(start.config) if start.config is not None else {}
    config["added_tokens_decoder"] = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                         "single_word", "special") if k in t}
        for t in out.data.get("added_tokens") or ()}
    files[TOKENIZER_CONFIG] = dumps(config)
    if start.special_map is not None:
        files[SPECIAL_TOKENS_MAP] = dumps(start.special_map)
    # the template goes with the tokenizer (mergekit saves the source tokenizer's own); None:
    # the donor's chat_template.jinja is not written beside another tokenizer
    files[CHAT_TEMPLATE] = start.template
    if donor.generation is not None:
        old = {i: t for t, i in donor.vocab.items()}
        new = {t: i for i, t in enumerate(out.tokens)}
        files[GENERATION_CONFIG] = dumps(_ids_remapped(
            donor.generation, old, new, _role_ids(start, new),
            f"step '{step.name}': generation_config.json"))
    return files


def _check_with_tokenizers(text: str, out: OutputVocab, step: Step, recipe: Recipe) -> None:
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - a dependency; checked when present
        return
    try:
        got = Tokenizer.from_str(text).get_vocab(with_added_tokens=True)
    except Exception as e:  # tokenizers raises plain Exceptions
        raise RecipeErrors([recipe.error(step.key_path + ("tokenizer",), "the output "
                                         f"tokenizer does not load with `tokenizers`: {e}")]
                           ) from None
    want = {t: i for i, t in enumerate(out.tokens)}
    if got != want:
        bad = next(t for t in want if got.get(t) != want[t])
        raise RecipeErrors([recipe.error(step.key_path + ("tokenizer",), "the output "
                                         f"tokenizer gives {bad!r} id {got.get(bad)}, not "
                                         f"{want[bad]}")])


def follow_config_donor(config: Mapping[str, Any], donor_config: Mapping[str, Any],
                        generation: Mapping[str, Any] | None,
                        donor_tok: ModelTokenizer | None, files: Mapping[str, bytes | None],
                        donor: str) -> tuple[dict[str, Any], bytes | None]:
    """``config`` (the output's, from `output.config`'s donor) with the donor's token ids
    (`ID_KEYS`) mapped through the donor's own tokenizer into the aligned vocabulary
    (``files``: the aligning step's tokenizer files), and the donor's ``generation`` config
    (its generation_config.json) mapped the same way, as the bytes to write (None: the donor
    has none, and neither has the output).

    Why: an aligning step maps the ids of its own donor, and `output.config` then took another
    model's config.json whose ids name that model's tokens: bos 63 became the output's token
    63 (another word), pad 64 an added token, and the step's donor's generation config was
    written beside it (found by black-box checks). A donor without a tokenizer.json keeps its
    ids as written in both files, with a warning.
    """
    out = dict(config)
    for key in ID_KEYS:
        if key in donor_config:
            out[key] = donor_config[key]
    if donor_tok is None:
        if any(isinstance(d.get(k), (int, list)) for d in (donor_config, generation or {})
               for k in ID_KEYS):
            log.warning("output.config: model '%s' has no tokenizer.json, so its token ids "
                        "(bos_token_id, ...) cannot be mapped into the aligned vocabulary: "
                        "they are kept as written; check them", donor)
        return out, None if generation is None else dumps(generation)
    start = _built_tokenizer(donor, files)
    new = start.vocab
    old = {i: t for t, i in donor_tok.vocab.items()}
    own = _role_ids(start, new)
    out = _ids_remapped(out, old, new, own, "output.config: config.json")
    if generation is None:
        return out, None
    return out, dumps(_ids_remapped(generation, old, new, own,
                                    "output.config: generation_config.json"))

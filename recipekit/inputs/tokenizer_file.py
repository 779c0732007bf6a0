"""The base model's tokenizer, read as a side file of the steps that tokenise prompts (`op: moe`).

Why: prompt-initialised MoE routers (steps/moe_gates.py) depend on the token ids of their
prompts, so the tokenizer is an input like a scheme file: read here, with the sources (steps
open no file), handed to the step as ``step.files[("tokenizer",)]``, pinned by `recipekit lock`
under ``steps.<step>.tokenizer`` and checked by `run --frozen`. It is the tokenizer of the model
the step's ``base`` reaches (following a step's ``base``, else its first ``from``), the model
whose non-weight files the step's output inherits. ``tokenizer_config.json`` (or
``special_tokens_map.json``) names the BOS token that mergekit-moe prepends to every prompt
(reference/moe.md §4.2).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipekit.errors import UnlocatedError
from recipekit.inputs.files import read_bounded
from recipekit.io.names import SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, TOKENIZER_JSON
from recipekit.recipe import Recipe, Step

TOKENIZER = TOKENIZER_JSON
TOKENIZER_CONFIGS = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
#: Ops whose steps tokenise prompts with the tokenizer of the model their ``base`` names.
TOKENIZING_OPS = ("moe",)
#: A tokenizer.json larger than this is not one (Gemma 3's is 33 MB).
MAX_TOKENIZER = 256 * 1024 * 1024
KEY = ("tokenizer",)


class TokenizerFileError(UnlocatedError):
    """Why the base's tokenizer cannot be used; the step that needs it locates the error."""


@dataclass(frozen=True)
class TokenizerFiles:
    """A tokenizer.json's text and the special tokens its config names."""

    model: str  # the recipe's model input it belongs to
    text: str
    sha256: str
    bos_token: str | None
    eos_token: str | None


def base_model_input(recipe: Recipe, name: str) -> str | None:
    """The model input behind ``name``: itself, or for a step its ``base``, else its first
    ``from`` (the donor rule of DESIGN.md §3), followed until a model input."""
    seen: set[str] = set()
    while name not in recipe.models:
        step = recipe.steps.get(name)
        if step is None or name in seen:
            return None
        seen.add(name)
        nxt = step.spec.get("base") or step.spec.get("from")
        if isinstance(nxt, list):
            nxt = nxt[0] if nxt else None
        if isinstance(nxt, Mapping):
            nxt = nxt.get("model") or nxt.get("use")
        if not isinstance(nxt, str):
            return None
        name = nxt
    return name


def token_text(value: Any) -> str | None:
    """A special token as tokenizer configs write it: a string, or ``{content: ...}``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer_files(model: str, directory: Path) -> tuple[TokenizerFiles, tuple[Path, ...]]:
    """The tokenizer of the model in ``directory`` and every file read for it.

    Raises:
        TokenizerFileError: no tokenizer.json, or one that cannot be read.
    """
    path = directory / TOKENIZER
    if not path.is_file():
        raise TokenizerFileError(
            f"the base model '{model}' has no {TOKENIZER}, which prompt gates tokenise with",
            hint="use a base model saved with its fast tokenizer (`tokenizer.save_pretrained`), "
            "or a gate mode without prompts (`random`, `uniform_random`)")
    try:
        raw, size = read_bounded(path, MAX_TOKENIZER)
        if raw is None:
            raise TokenizerFileError(f"{path}: {size} bytes is too large for a {TOKENIZER}")
        text = raw.decode()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerFileError(f"cannot read {path}: {e}") from None
    files = [path]
    bos = eos = None
    for name in TOKENIZER_CONFIGS:
        p = directory / name
        if not p.is_file():
            continue
        try:
            cfg_raw, _ = read_bounded(p, MAX_TOKENIZER)
            cfg = json.loads(cfg_raw.decode()) if cfg_raw is not None else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerFileError(f"cannot read {p}: {e}") from None
        files.append(p)
        if isinstance(cfg, Mapping):
            bos = bos or token_text(cfg.get("bos_token"))
            eos = eos or token_text(cfg.get("eos_token"))
    digest = hashlib.sha256(raw).hexdigest()
    return TokenizerFiles(model, text, digest, bos, eos), tuple(files)


def resolve_tokenizers(recipe: Recipe, checkpoints: Mapping[str, Any]
                       ) -> dict[tuple[str, Any], Any]:
    """The tokenizer side file of every tokenising step (`TOKENIZING_OPS`) with a ``base``,
    by (step name, ``("tokenizer",)``); a tokenizer that cannot be read is kept as the side
    file's problem, raised only if the step tokenises prompts."""
    out: dict[tuple[str, Any], Any] = {}
    for step in recipe.steps.values():
        found = resolve_tokenizer(recipe, step, checkpoints)
        if found is not None:
            out[(step.name, KEY)] = found
    return out


def resolve_tokenizer(recipe: Recipe, step: Step, checkpoints: Mapping[str, Any]) -> Any:
    """``step``'s tokenizer side file, or None when it names no base model input."""
    from recipekit.inputs.side_files import SideFile

    if step.op not in TOKENIZING_OPS or not isinstance(step.spec.get("base"), str):
        return None
    model = base_model_input(recipe, step.spec["base"])
    ckpt = checkpoints.get(model) if model is not None else None
    if ckpt is None or not hasattr(ckpt, "path"):
        return None
    written = f"{model}/{TOKENIZER}"
    try:
        content, files = read_tokenizer_files(model, ckpt.path)
    except TokenizerFileError as e:
        return SideFile(step.name, KEY, written, ckpt.path / TOKENIZER, (), problem=e)
    return SideFile(step.name, KEY, written, files[0], files, content)

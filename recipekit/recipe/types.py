"""The typed recipe (`Recipe`, its models, steps and output) and the layer-range grammar.

What `load_recipe` returns once a document passed the schema and the semantic checks; steps,
planning and tools read recipes through these types only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipekit.errors import KeyPath, RecipeError, UsageError
from recipekit.recipe.document import Document, show

FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = "5GB"
DEFAULT_REVISION = "main"

# Layer-range grammar (never eval)

#: ASCII digits only: `\d` would also take "١" or "７", which int() then reads as numbers.
_RANGE = re.compile(
    r"^\s*range\s*\(\s*(-?[0-9]+)\s*,\s*(-?[0-9]+)\s*(?:,\s*(-?[0-9]+)\s*)?\)\s*$")
#: What marks a string as meant to be a range (the schema's pattern for layer_range_string).
RANGE_PREFIX = re.compile(r"^\s*range\(")


def parse_layer_range(text: str) -> range:
    """Parse ``"range(a,b)"`` / ``"range(a,b,step)"`` into a non-empty `range`.

    Python's half-open semantics, negative steps included (``"range(7,-1,-1)"`` selects
    layers 7..0, as in Python and fusion_bench); every selected index is non-negative; the
    range must not be empty.

    Example:
        >>> parse_layer_range("range(8, 32)")
        range(8, 32)
        >>> list(parse_layer_range("range(3, -1, -1)"))
        [3, 2, 1, 0]

    Raises:
        ValueError: with a message that echoes what was written.
    """
    m = _RANGE.match(text)
    if not m:
        raise ValueError(
            f"{text!r} is not a layer range; write \"range(start, stop)\" or "
            "\"range(start, stop, step)\" with integers")
    try:
        start, stop = int(m.group(1)), int(m.group(2))
        step = int(m.group(3)) if m.group(3) is not None else 1
    except ValueError:  # more than 4300 digits
        raise ValueError(f"{show(text)}: a number in it is far too large") from None
    if step == 0:
        raise ValueError(f"{text!r}: step must not be 0")
    r = range(start, stop, step)
    if start < 0 or (stop < 0 and step > 0) or (r and r[-1] < 0):
        raise ValueError(f"{text!r}: layer indices must not be negative")
    if not r:  # len() overflows past sys.maxsize
        if start == stop:
            raise ValueError(f"{text!r} is empty (start equals stop); ranges are half-open, "
                             f"so range({start},{stop + 1}) selects layer {start}")
        if step < 0:
            raise ValueError(f"{text!r} is empty (with a negative step, start {start} must be "
                             f"above stop {stop})")
        raise ValueError(f"{text!r} is empty (start {start} is past stop {stop}); "
                         f"did you mean range({stop},{start})?")
    return r



@dataclass(frozen=True)
class ModelRef:
    """A named checkpoint input: a local directory, a hub repo at a revision or a URL."""

    name: str
    path: Path | None  # resolved against the recipe's directory; None for hub models
    written: str  # as the user wrote it, for messages
    layer_prefix: str | None
    key_path: KeyPath
    hub: str | None = None
    revision: str = DEFAULT_REVISION
    url: str | None = None  # object storage (``s3://bucket/prefix``); path and hub are None


@dataclass(frozen=True)
class Step:
    """One step of the recipe: a name, an op and its (schema-checked) parameters.

    ``files`` holds the side files the step names (scheme files, scalings logs), read by the
    inputs layer with the sources and handed to the step by `compile_plan`, keyed by their key
    path within the step: the step uses them and opens nothing itself.
    """

    name: str
    op: str
    spec: Mapping[str, Any]
    index: int
    files: Mapping[KeyPath, Any] = field(default_factory=dict, compare=False)

    @property
    def key_path(self) -> KeyPath:
        return ("steps", self.index)


@dataclass(frozen=True)
class Output:
    path: Path
    model: str
    dtype: str | None
    shard_size: int
    config: str | None
    adapter: Mapping[str, Any] | None = None  # how an adapter-set output is written
    #: `auto`, a built-in name, literal Jinja, or {file: path} (inputs/chat_template.py)
    chat_template: str | Mapping[str, Any] | None = None
    url: str | None = None  # an object-storage output (``s3://...``); ``path`` is then unused


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: models, steps in dependency order, output, and its located document."""

    file: Path
    document: Document
    name: str | None
    description: str | None
    models: Mapping[str, ModelRef]
    steps: Mapping[str, Step]  # topologically ordered
    output: Output
    adapters: Mapping[str, ModelRef] = field(default_factory=dict)  # PEFT adapter inputs
    #: The values of the recipe's variables used (defaults, or as set), by name.
    variables: Mapping[str, Any] = field(default_factory=dict)

    def error(self, path: KeyPath, message: str, *, hint: str | None = None,
              key: bool = False, cls: type[UsageError] = RecipeError) -> RecipeError:
        """A `RecipeError` (or ``cls``) located at ``path`` in the user's file: the one way
        steps build located errors."""
        return self.document.error(path, message, hint=hint, key=key, cls=cls)

    def canonical(self) -> dict[str, Any]:
        """The document with defaults filled in: what the manifest records and the plan hashes.

        Variables are already substituted into it and their block is left out, so a recipe
        run with ``--set alpha=0.3`` hashes like the same recipe with ``alpha: 0.3`` written
        inline (the manifest records the values separately, as ``variables``)."""
        data = json.loads(json.dumps(self.document.data))
        data.pop("variables", None)
        data.setdefault("steps", [])
        out = data.setdefault("output", {})
        out["model"] = self.output.model
        out["shard_size"] = self.output.shard_size
        return data


"""Numeric parameters: a number, a layer gradient, or a rule list — resolved per output tensor.

DESIGN.md §2: a parameter is ``0.3``, ``{gradient: [v0, ..., vk]}``, or
``[{match: "*.mlp.*", value: 0.3}, {value: 0.5}]`` whose values may be gradients. ``match`` is
``fnmatch`` on the full output tensor name and the first matching rule wins; a rule without
``match`` is the default. A gradient is evaluated piecewise-linearly at t = i/(N-1) for layer i of
the step's output (N layers; t = 0 when N = 1). Tensors before the layers (embeddings) take t = 0
and tensors after them (final norm, heads) t = 1 — unlike mergekit, which uses t = 0 for both.

Torch-free: validation and planning use it.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from recipekit.arch import LayerStack, load_architectures
from recipekit.errors import KeyPath, ParamError, format_key_path

if TYPE_CHECKING:
    from recipekit.recipe.types import Recipe

log = logging.getLogger(__name__)

Param = float | Mapping[str, Any] | Sequence[Mapping[str, Any]]
#: what makes a `match` a pattern rather than one exact name (fnmatch's special characters)
_GLOB = frozenset("*?[")


def evaluate_gradient(values: Sequence[float], t: float) -> float:
    """Piecewise-linear interpolation of ``values`` spread evenly over [0, 1], at ``t``.

    Example:
        >>> evaluate_gradient([0.0, 1.0, 0.0], 0.25)
        0.5
    """
    if len(values) == 1:
        return float(values[0])
    pos = min(max(t, 0.0), 1.0) * (len(values) - 1)
    lo = min(int(pos), len(values) - 2)
    frac = pos - lo
    return float(values[lo]) * (1.0 - frac) + float(values[lo + 1]) * frac


def layer_position(name: str, stack: LayerStack) -> float:
    """t for a tensor: i/(N-1) inside layer i, 0 before the layers, 1 after them."""
    hit = stack.split(name)
    if hit is not None:
        n = stack.num_layers
        return hit[0] / (n - 1) if n > 1 else 0.0
    return 0.0 if is_before_layers(name, stack) else 1.0


def is_before_layers(name: str, stack: LayerStack) -> bool:
    """Whether a non-layer tensor feeds the layers (embeddings) rather than following them.

    From the architecture description when the family is known (its ``pre`` weights); else by
    name: embeddings, positional tables, patch projections and class tokens come first.
    """
    arch = load_architectures().get(stack.family) if stack.family else None
    if arch is not None:
        return any(name == stack.base + rel for rel in arch.weights["pre"])
    lowered = name.lower()
    return any(k in lowered for k in ("embed", "wte", "wpe", "patch", "cls_token",
                                      "position", "token_type"))


def resolve(param: Param, name: str, stack: LayerStack) -> float:
    """The value of ``param`` for output tensor ``name``.

    Raises:
        ParamError: no rule matches ``name`` and there is no default rule.
    """
    if isinstance(param, bool):
        raise ParamError(f"expected a number, got {param!r}")
    if isinstance(param, (int, float)):
        return float(param)
    if isinstance(param, Mapping):
        return evaluate_gradient(param["gradient"], layer_position(name, stack))
    for rule in param:
        pattern = rule.get("match")
        if pattern is None or fnmatch.fnmatchcase(name, pattern):
            return resolve(rule["value"], name, stack)
    raise ParamError(f"no rule matches `{name}`; add a default rule without `match` "
                     "(e.g. `{value: 0.5}`)")


def unmatched_rules(param: Any, names: Iterable[str]) -> list[tuple[int, str]]:
    """(index, pattern) of each rule of ``param`` whose `match` matches none of ``names``.

    Example:
        >>> unmatched_rules([{"match": "mlp", "value": 1}, {"value": 0}], ["a.mlp.w"])
        [(0, 'mlp')]
    """
    if not isinstance(param, list):
        return []
    names = list(names)
    return [(i, rule["match"]) for i, rule in enumerate(param)
            if isinstance(rule, Mapping) and isinstance(rule.get("match"), str)
            and not any(fnmatch.fnmatchcase(n, rule["match"]) for n in names)]


def warn_unmatched_rules(recipe: Recipe, step: str, path: KeyPath, param: Any,
                         names: Iterable[str]) -> None:
    """Warn, located at the rule, for each rule of ``param`` (at ``path``) that matches no
    tensor of step ``step`` (``names``). Why: such a rule never applies, and nothing else says
    so — a typo (`*mpl*`) or mergekit's habit of filters that are substrings (`mlp`, a glob that
    matches only a tensor named exactly `mlp`) silently leaves those tensors to the next rule.
    """
    for i, pattern in unmatched_rules(param, names):
        where = path + (i,)
        hint = (f"`match` is a glob on the full tensor name (mergekit's `filter` is a "
                f"substring): write `*{pattern}*` for the names that contain `{pattern}`"
                if not _GLOB & set(pattern) else "`match` is a glob on the full tensor name; "
                "`recipekit inspect --headers-only -v MODEL` lists the names")
        log.warning("%s: %s: rule `match: %s` matches no tensor of step '%s', so it never "
                    "applies; %s", recipe.document.locate(where).prefix(),
                    format_key_path(where), pattern, step, hint)


def is_constant(param: Param) -> bool:
    """A plain number (no gradient, no rules)."""
    return isinstance(param, (int, float)) and not isinstance(param, bool)

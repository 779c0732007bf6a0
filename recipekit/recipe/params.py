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
from collections.abc import Mapping, Sequence
from typing import Any

from recipekit.arch import LayerStack, load_architectures
from recipekit.errors import ParamError

Param = float | Mapping[str, Any] | Sequence[Mapping[str, Any]]


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


def is_constant(param: Param) -> bool:
    """A plain number (no gradient, no rules)."""
    return isinstance(param, (int, float)) and not isinstance(param, bool)

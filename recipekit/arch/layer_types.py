"""The `layer_types` transformers derives for a config.json that does not list them.

Why: a layer's attention kind (sliding window or full) is a per-layer config list, and the
`layers` op moves it with its layer (`steps.layers`). Older configs on the Hub (Gemma-2,
Gemma-3, Cohere-2, Qwen2/Qwen3 with sliding windows) have no `layer_types`: transformers 5
derives them from the layer index and the layer count when it loads the config, so a layer
moved to another index, or a stack of another depth, silently changed kind (a Gemma-2 with
layer 0 removed: every layer swapped sliding and full attention, logits 6.5 away; found by a
black-box check). With the rule transformers applies, the source's list is known and moves like
one written in the config.

`layer_types_of` is what the ops use: the list config.json holds, else the derived one. The
`layers` op and the depth maps of `coalesce`/`decoalesce` write the result out when the
derivation for the new stack would give its layers other kinds (and `coalesce` refuses a depth
group whose layers are of different kinds, listed or derived).

The rules are transformers 5's `__post_init__` of each config class (the model_types below);
other model types return None (their list, if any, is read from config.json as written).
Oracle: tests/steps/test_layers.py loads configs without the list in transformers and compares
its `layer_types` with these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"

#: model_type -> the default of `sliding_window_pattern`: every k-th layer (1-based) is full
_EVERY_KTH = {"gemma2": None, "gemma3_text": 6, "cohere2": 4}
#: model types whose layers from `max_window_layers` on slide when `use_sliding_window` is set
_FROM_MAX_WINDOW = {"qwen2", "qwen3"}


def derived_layer_types(config: Mapping[str, Any], n: int) -> list[str] | None:
    """The `layer_types` transformers 5 gives a config of ``n`` layers with no such list, or
    None where no rule is known (or the config lists them: nothing is derived then)."""
    if config.get("layer_types") is not None:
        return None
    model_type = config.get("model_type")
    if model_type in _EVERY_KTH:
        default = _EVERY_KTH[model_type]
        k = 2 if default is None else int(config.get("sliding_window_pattern") or default)
        return [SLIDING if (i + 1) % k else FULL for i in range(n)]
    if model_type in _FROM_MAX_WINDOW:
        window = config.get("sliding_window", 4096) if config.get("use_sliding_window") else None
        first = config.get("max_window_layers", 28)
        return [SLIDING if window is not None and i >= first else FULL for i in range(n)]
    return None


def layer_types_of(config: Mapping[str, Any], n: int) -> list[str] | None:
    """A stack's `layer_types`: the list config.json holds when it has ``n`` entries, else the
    one transformers 5 derives (`derived_layer_types`), else None."""
    listed = config.get("layer_types")
    if isinstance(listed, list) and len(listed) == n:
        return listed
    return derived_layer_types(config, n)

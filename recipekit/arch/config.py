"""Read and write (possibly nested) config.json keys, as steps and the output config do.

A key is a path into config.json, e.g. ``("text_config", "num_hidden_layers")``: multimodal
configs nest their language model's keys. Writers return deep copies; configs are never
changed in place.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

ConfigKey = tuple[str, ...]  # a path into config.json, e.g. ("text_config", "num_hidden_layers")

_ABSENT = object()


def config_get(config: Mapping[str, Any], key: ConfigKey, default: Any = None) -> Any:
    """Read a (possibly nested) config value; ``default`` (None) when absent."""
    cur: Any = config
    for part in key:
        if not isinstance(cur, Mapping) or part not in cur:
            return default
        cur = cur[part]
    return cur


def config_has(config: Mapping[str, Any], key: ConfigKey) -> bool:
    """Whether a (possibly nested) key is present, even holding null."""
    return config_get(config, key, _ABSENT) is not _ABSENT


def with_config(config: Mapping[str, Any], updates: Mapping[ConfigKey, Any]) -> dict[str, Any]:
    """A deep copy of ``config`` with each (possibly nested) key set to its new value."""
    out = copy.deepcopy(dict(config))
    for key, value in updates.items():
        cur = out
        for part in key[:-1]:
            cur = cur.setdefault(part, {})
        cur[key[-1]] = copy.deepcopy(value)
    return out


def without_config_keys(config: Mapping[str, Any], keys: list[ConfigKey]) -> dict[str, Any]:
    """A deep copy of ``config`` without the (possibly nested) ``keys``; absent ones are fine."""
    out = copy.deepcopy(dict(config))
    for key in keys:
        cur: Any = out
        for part in key[:-1]:
            cur = cur.get(part) if isinstance(cur, dict) else None
        if isinstance(cur, dict):
            cur.pop(key[-1], None)
    return out

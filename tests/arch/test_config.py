"""arch/config.py: (possibly nested) config.json keys read and written without side effects.

Oracle: plain dict semantics.
"""

from __future__ import annotations

from recipekit.arch.config import config_get, config_has, with_config, without_config_keys

CONFIG = {"num_hidden_layers": 4, "text_config": {"hidden_size": 8, "pad": None}}


def test_get_and_has_follow_nested_keys():
    assert config_get(CONFIG, ("text_config", "hidden_size")) == 8
    assert config_get(CONFIG, ("text_config", "missing")) is None
    assert config_get(CONFIG, ("num_hidden_layers", "deeper")) is None
    assert config_has(CONFIG, ("text_config", "pad"))  # present, holding null
    assert not config_has(CONFIG, ("text_config", "missing"))


def test_writers_return_copies():
    updated = with_config(CONFIG, {("text_config", "hidden_size"): 16, ("a", "b"): [1]})
    assert updated["text_config"]["hidden_size"] == 16 and updated["a"] == {"b": [1]}
    assert CONFIG["text_config"]["hidden_size"] == 8
    removed = without_config_keys(CONFIG, [("text_config", "pad"), ("no", "such")])
    assert "pad" not in removed["text_config"] and "pad" in CONFIG["text_config"]

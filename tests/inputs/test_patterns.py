"""`rank_pattern`/`alpha_pattern` keys matched in bounded time (issue 17 item 7).

Oracle: PEFT's rule itself, ``re.match(rf"(.*\\.)?({key})$", name)`` (peft.utils.other.
get_pattern_key), run by Python's `re` on keys where it is fast; the bounded matcher must give the
same answer on every (key, name) pair, and answer the hostile key at once.
"""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recipekit.inputs.patterns import PatternError, first_match, key_matcher

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.11.self_attn.v_proj",
         "model.layers.1.mlp.gate_proj", "q_proj", "xq_proj", "lm_head", "", "a.b\n",
         "base_model.model.model.layers.3.self_attn.q_proj", "model.embed_tokens", "ünï.q_proj"]
KEYS = ["q_proj", "model.layers.0.self_attn.q_proj", "layers.1.mlp.gate_proj", "q.proj",
        r"^.*\.q_proj$", r".*\.q_proj", r"model\.layers\.[0-3]\.self_attn\.(q|v)_proj",
        r"layers\.\d+\.mlp\..*", r"\bq_proj", r"q_proj\b", r"\Bq_proj", r"[^\d.]+_proj",
        r"(?P<x>q)_proj", r"(?:q|k|v)_proj", r"\w+", r"\w*_proj\Z", r"x{0,3}q_proj",
        r"(q|)_proj", r"lm_head|embed_tokens", r"layers\.1[0-9]?\..*", r"[a-z]+?\.q_proj",
        r".*", "", r"\s*q_proj", r"\S+", r"\D+", r"\W?q_proj", r"[\w.]+", r"\A.*proj",
        "(a)(b", r"a)(b", r"(.?){3}q_proj", r"(q|q)*_proj"]


@pytest.mark.parametrize("key", KEYS)
def test_same_answer_as_peft_rule(key):
    try:
        wanted = {n: re.match(rf"(.*\.)?({key})$", n) is not None for n in NAMES}
    except re.error:
        with pytest.raises(PatternError, match="not a valid regular expression"):
            key_matcher(key)
        return
    matcher = key_matcher(key)
    assert {n: matcher(n) for n in NAMES} == wanted


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab.()|*?+{}[^$\\d1,-", max_size=10),
       st.text(alphabet="ab.1_", max_size=12))
def test_generated_keys_agree_with_re(key, name):
    """Keys from a regex alphabet small enough that `re` itself stays fast here."""
    try:
        wanted = re.match(rf"(.*\.)?({key})$", name) is not None
    except (re.error, RecursionError, OverflowError):
        with pytest.raises(PatternError):
            key_matcher(key)
        return
    try:
        matcher = key_matcher(key)
    except PatternError:
        return  # a refused feature (backreference, lookaround, flags)
    assert matcher(name) == wanted


@pytest.mark.parametrize("key", ["(.*.*)*q_projX", "(a+)+$", "(x*)*y", "(.*){20}z", "(a{2})*"])
def test_nested_quantifiers_are_refused_at_once(key):
    start = time.monotonic()
    with pytest.raises(PatternError, match="nests quantifiers"):
        key_matcher(key)
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("key", ["(a|a)*b", "(a|aa)*c", ".*.*.*.*.*.*.*.*X", "(.?){30}z"])
def test_backtracking_keys_without_nesting_answer_at_once(key):
    """Exponential or high-polynomial for `re`, linear here."""
    name = "model.layers.0.self_attn." + "a" * 60 + "q_proj" * 20
    start = time.monotonic()
    assert key_matcher(key)(name) is False
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize(("key", "reason"), [
    (r"(q)\1", "backreference"), (r"(?=q)q_proj", "lookaround"), (r"(?<!x)q", "lookaround"),
    (r"(?>q)_proj", "atomic group"), (r"q++_proj", "possessive"), (r"(?i:Q)_proj", "flags"),
    (r"(q)?(?(3)a|b)", "conditional"), ("(", "not a valid regular expression"),
    ("[a-", "not a valid regular expression"), ("(?i)q_proj", "not a valid regular expression"),
    ("a{30000}", "states"),
])
def test_refused_keys_say_why(key, reason):
    with pytest.raises(PatternError, match=reason):
        key_matcher(key)


def test_first_match_follows_dict_order():
    keys = {"q_proj": 2, r".*_proj": 4, "model.layers.0.self_attn.q_proj": 8}
    assert first_match(keys, "model.layers.0.self_attn.q_proj") == "q_proj"
    assert first_match(keys, "model.layers.0.self_attn.v_proj") == r".*_proj"
    assert first_match(keys, "lm_head") is None

"""PEFT's `rank_pattern` / `alpha_pattern` keys, matched in bounded time.

PEFT (`peft.utils.other.get_pattern_key`, reference/adapters.md §2.2) gives a module the value of
the first key ``k`` (in the dict's order) for which ``re.match(rf"(.*\\.)?({k})$", module)``
succeeds: ``k`` is a regex matched against a dot-aligned suffix of the module name. The keys come
from an adapter's config, i.e. from whoever made the adapter, and Python's backtracking `re` takes
exponential time on keys such as ``(.*.*)*q_projX`` (issue 17 item 7). So:

* a key made only of letters, digits, ``_``, ``-`` and ``.`` (every key PEFT writes itself: module
  names and their suffixes) runs through `re` as PEFT does: with no quantifier in the key the
  backtracking is bounded by (name length × key length);
* any other key is parsed with Python's own regex parser (so what is valid is exactly what `re`
  accepts) and matched by a Thompson NFA simulation over the parsed pattern: time linear in the
  module name (× the pattern's size), whatever the pattern. Same match/no-match answer as `re`
  for everything it accepts. It refuses what a set of states cannot express or what could not be
  told apart from `re`'s answer: backreferences, conditional groups, lookarounds, atomic groups and
  possessive quantifiers, inline flags; and patterns whose expansion (bounded repeats
  ``{m,n}`` unrolled) exceeds `MAX_STATES` states;
* a key that nests quantifiers (a group repeated more than once that itself holds a repeating
  quantifier, like ``(a+)+`` or ``(.*.*)*``) is refused: recipekit would match it in linear time,
  but PEFT's `re` can backtrack exponentially on it, so no adapter PEFT loaded in bounded time
  has one, and a hostile adapter is told apart at once;
* a key that is not a valid regex is refused (`PatternError`), where PEFT would crash or, in
  recipekit before, the key was silently ignored.

Oracle: tests/inputs/test_patterns.py compares `key_matcher` with `re.match` on generated
patterns and names; tests/graph/test_adapterset.py folds adapters with such keys against PEFT's
`merge_and_unload` and times the hostile key.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import Any

try:  # Python >= 3.11
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

#: Most NFA states one key may expand to (``{m,n}`` repeats are unrolled).
MAX_STATES = 20_000
_PLAIN = re.compile(r"[A-Za-z0-9_.\-]+")
_ANCHORS = ("AT_BEGINNING", "AT_BEGINNING_STRING", "AT_END", "AT_END_STRING", "AT_BOUNDARY",
            "AT_NON_BOUNDARY")
_UNSUPPORTED = {
    "GROUPREF": "a backreference", "GROUPREF_EXISTS": "a conditional group",
    "ASSERT": "a lookaround", "ASSERT_NOT": "a lookaround", "ATOMIC_GROUP": "an atomic group",
    "POSSESSIVE_REPEAT": "a possessive quantifier",
}


class PatternError(ValueError):
    """A pattern key recipekit refuses: not a regex, or a feature outside the bounded matcher."""


def first_match(keys: Iterable[str], module: str) -> str | None:
    """PEFT's `get_pattern_key`: the first key matching ``module``, or None."""
    for key in keys:
        if key_matcher(key)(module):
            return key
    return None


@functools.lru_cache(maxsize=4096)
def key_matcher(key: str) -> Callable[[str], bool]:
    """A function telling whether ``re.match(rf"(.*\\.)?({key})$", name)`` succeeds, in time
    linear in ``len(name)``.

    Raises:
        PatternError: ``key`` is not a valid regex, uses a refused feature, or is too large.
    """
    if not isinstance(key, str):
        raise PatternError(f"is {type(key).__name__}, not a string")
    if _PLAIN.fullmatch(key):
        plain = re.compile(rf"(.*\.)?({key})$")
        return lambda name: plain.match(name) is not None
    wrapped = rf"(.*\.)?({key})$"
    try:
        parsed = _sre_parse.parse(wrapped)
    except (re.error, RecursionError, OverflowError) as e:
        raise PatternError(f"is not a valid regular expression ({_reason(e)})") from None
    if parsed.state.flags & ~re.UNICODE.value:
        raise PatternError("sets regex flags, which recipekit does not match")
    nfa = _Nfa()
    try:
        nfa.start = nfa.sequence(list(parsed), nfa.add("match", None, ()))
    except RecursionError:
        raise PatternError("is nested too deeply") from None
    return nfa.matches


def _reason(e: Exception) -> str:
    """`re`'s reason without its position, which counts in PEFT's wrapped pattern."""
    return str(getattr(e, "msg", None) or e) if isinstance(e, re.error) else "too deeply nested"


class _Nfa:
    """Thompson NFA over a parsed pattern: states are (kind, argument, successors)."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.args: list[Any] = []
        self.nexts: list[tuple[int, ...]] = []
        self.start = 0
        self.maxrepeat = _sre_parse.MAXREPEAT

    def add(self, kind: str, arg: Any, nexts: tuple[int, ...]) -> int:
        if len(self.kinds) >= MAX_STATES:
            raise PatternError(f"expands to more than {MAX_STATES} states (large `{{m,n}}` "
                               "repeats)")
        self.kinds.append(kind)
        self.args.append(arg)
        self.nexts.append(nexts)
        return len(self.kinds) - 1

    def sequence(self, items: list[tuple[Any, Any]], nxt: int) -> int:
        for op, av in reversed(items):
            nxt = self.item(str(op), av, nxt)
        return nxt

    def item(self, op: str, av: Any, nxt: int) -> int:
        if op in ("LITERAL", "NOT_LITERAL", "ANY", "IN"):
            for kind, _ in av if op == "IN" else ():
                if str(kind) not in ("NEGATE", "LITERAL", "RANGE", "CATEGORY"):
                    raise PatternError(f"uses the character-set item {kind}, which recipekit "
                                       "does not match")
            return self.add("char", (op, av), (nxt,))
        if op == "AT":
            if str(av) not in _ANCHORS:
                raise PatternError(f"uses the anchor {av}, which recipekit does not match")
            return self.add("at", str(av), (nxt,))
        if op == "BRANCH":
            return self.add("split", None, tuple(self.sequence(list(alt), nxt) for alt in av[1]))
        if op == "SUBPATTERN":
            if av[1] or av[2]:
                raise PatternError("sets regex flags inside a group, which recipekit does not "
                                   "match")
            return self.sequence(list(av[3]), nxt)
        if op in ("MAX_REPEAT", "MIN_REPEAT"):  # lazy or greedy: the same match/no match
            return self.repeat(av[0], av[1], list(av[2]), nxt)
        what = _UNSUPPORTED.get(op, f"the regex construct {op}")
        raise PatternError(f"uses {what}, which recipekit refuses (it cannot be matched in "
                           "bounded time)")

    def repeat(self, low: int, high: int, body: list[tuple[Any, Any]], nxt: int) -> int:
        if high > 1 and _repeats(body):
            raise PatternError("nests quantifiers (like `(a+)+`), on which PEFT's own matcher "
                               "(Python's `re`) can take exponential time: an adapter PEFT "
                               "could not load in bounded time")
        if high == self.maxrepeat:
            loop = self.add("split", None, ())
            self.nexts[loop] = (self.sequence(body, loop), nxt)
            start = loop
        else:
            start = nxt
            for _ in range(high - low):
                start = self.add("split", None, (self.sequence(body, start), nxt))
        for _ in range(low):
            start = self.sequence(body, start)
        return start

    def matches(self, name: str) -> bool:
        current = self._closure([self.start], name, 0)
        for pos, ch in enumerate(name):
            if any(self.kinds[s] == "match" for s in current):
                return True
            step = [self.nexts[s][0] for s in current
                    if self.kinds[s] == "char" and _char_ok(self.args[s], ch)]
            if not step:
                return False
            current = self._closure(step, name, pos + 1)
        return any(self.kinds[s] == "match" for s in current)

    def _closure(self, states: list[int], name: str, pos: int) -> set[int]:
        seen: set[int] = set()
        stack = list(states)
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            kind = self.kinds[s]
            if kind == "split" or (kind == "at" and _at_ok(self.args[s], name, pos)):
                stack.extend(self.nexts[s])
        return {s for s in seen if self.kinds[s] in ("char", "match")}


def _repeats(items: Any) -> bool:
    """Whether ``items`` (a parsed pattern) holds a quantifier that may repeat (max > 1)."""
    for op, av in items:
        name = str(op)
        if name.endswith("REPEAT") and av[1] > 1:
            return True
        if name == "SUBPATTERN" and _repeats(av[-1]):
            return True
        if name == "BRANCH" and any(_repeats(alt) for alt in av[1]):
            return True
        if name.endswith("REPEAT") and _repeats(av[2]):
            return True
    return False


def _word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _at_ok(code: str, name: str, pos: int) -> bool:
    n = len(name)
    if code in ("AT_BEGINNING", "AT_BEGINNING_STRING"):
        return pos == 0
    if code == "AT_END":
        return pos == n or (pos == n - 1 and name[-1] == "\n")
    if code == "AT_END_STRING":
        return pos == n
    if code in ("AT_BOUNDARY", "AT_NON_BOUNDARY"):
        if n == 0:
            return False
        before = pos > 0 and _word(name[pos - 1])
        after = pos < n and _word(name[pos])
        return (before != after) == (code == "AT_BOUNDARY")
    return False  # not reached: `_Nfa.item` admits only _ANCHORS


def _category(cat: str, ch: str) -> bool:
    if cat.endswith("DIGIT"):
        hit = ch.isdecimal()
    elif cat.endswith("SPACE"):
        hit = ch.isspace()
    elif cat.endswith("WORD"):
        hit = _word(ch)
    else:
        hit = ch in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # LINEBREAK
    return hit != ("NOT_" in cat)


def _char_ok(arg: tuple[str, Any], ch: str) -> bool:
    op, av = arg
    if op == "LITERAL":
        return ord(ch) == av
    if op == "NOT_LITERAL":
        return ord(ch) != av
    if op == "ANY":
        return ch != "\n"
    negate = False
    hit = False
    for item_op, item_av in av:
        kind = str(item_op)
        if kind == "NEGATE":
            negate = True
        elif kind == "LITERAL":
            hit = hit or ord(ch) == item_av
        elif kind == "RANGE":
            hit = hit or item_av[0] <= ord(ch) <= item_av[1]
        elif kind == "CATEGORY":
            hit = hit or _category(str(item_av), ch)
    return hit != negate

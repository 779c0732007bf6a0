"""Fuzzing recipes, part 2: mutations of generated documents (dropped, unknown and renamed
keys, swapped types, odd numbers and strings, duplicate steps, unknown and cyclic references,
deep nesting, long chains), their serialization as YAML or JSON, and text- and byte-level
mutations of whole files, including the recipes in `recipes/`. `recipe_files` draws every kind
of case.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from tests.helpers.fuzz_documents import (
    KNOWN_KEYS,
    SEED_RECIPES,
    json_values,
    names,
    near_misses,
    numbers,
    odd_strings,
    recipe_documents,
)

# ---------------------------------------------------------------------------------------------
# Structural mutations

Path_ = tuple[Any, ...]


def iter_paths(obj: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from iter_paths(v, prefix + (i,))


def get_at(obj: Any, path: Path_) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def set_at(obj: Any, path: Path_, value: Any) -> Any:
    if not path:
        return value
    get_at(obj, path[:-1])[path[-1]] = value
    return obj


def _pick_path(draw: st.DrawFn, doc: Any, *, root: bool = False,
               where: Callable[[Any], bool] | None = None) -> Path_ | None:
    paths = [p for p in iter_paths(doc) if (root or p) and (where is None or where(get_at(doc, p)))]
    return draw(st.sampled_from(paths)) if paths else None


def _other_type(draw: st.DrawFn, value: Any) -> Any:
    choices = [None, True, 0, 7, -1, 3.0, 0.5, "", "x", "range(0,2)", [], [1], ["a"], {},
               {"a": 1}, {"from": "tiny", "range": [0, 2]}]
    return copy.deepcopy(draw(st.sampled_from(
        [c for c in choices if type(c) is not type(value)] + [draw(json_values)])))


def m_drop(draw: st.DrawFn, doc: Any) -> Any:
    p = _pick_path(draw, doc)
    if p is not None:
        parent = get_at(doc, p[:-1])
        del parent[p[-1]]
    return doc


def m_unknown_key(draw: st.DrawFn, doc: Any) -> Any:
    p = _pick_path(draw, doc, root=True, where=lambda v: isinstance(v, dict))
    if p is None:
        return doc
    target = get_at(doc, p)
    base = draw(st.sampled_from(list(target) + KNOWN_KEYS if target else KNOWN_KEYS))
    key = draw(st.one_of(st.sampled_from(near_misses(str(base)) or ["x"]), names,
                         st.sampled_from(KNOWN_KEYS), st.text(max_size=6)))
    target[key] = draw(st.one_of(json_values, st.just(copy.deepcopy(target.get(base)))))
    return doc


def m_rename_key(draw: st.DrawFn, doc: Any) -> Any:
    p = _pick_path(draw, doc, root=True, where=lambda v: isinstance(v, dict) and bool(v))
    if p is None:
        return doc
    target = get_at(doc, p)
    old = draw(st.sampled_from(list(target)))
    new = draw(st.one_of(st.sampled_from(near_misses(str(old)) or ["x"]), odd_strings, names))
    items = [(new if k == old else k, v) for k, v in target.items()]
    target.clear()
    target.update(items)
    return doc


def m_swap_type(draw: st.DrawFn, doc: Any) -> Any:
    p = _pick_path(draw, doc)
    return doc if p is None else set_at(doc, p, _other_type(draw, get_at(doc, p)))


def m_number(draw: st.DrawFn, doc: Any) -> Any:
    p = _pick_path(draw, doc, where=lambda v: not isinstance(v, (dict, list)))
    return doc if p is None else set_at(doc, p, draw(numbers))


def m_string(draw: st.DrawFn, doc: Any) -> Any:
    p = _pick_path(draw, doc, where=lambda v: not isinstance(v, (dict, list)))
    return doc if p is None else set_at(doc, p, draw(odd_strings))


def _steps(doc: Any) -> list[Any]:
    steps = doc.get("steps") if isinstance(doc, dict) else None
    return steps if isinstance(steps, list) else []


def _all_names(doc: Any) -> list[str]:
    out = list(doc.get("models") or []) if isinstance(doc, dict) and isinstance(
        doc.get("models"), dict) else []
    out += [s["name"] for s in _steps(doc) if isinstance(s, dict) and isinstance(
        s.get("name"), str)]
    return out


def m_duplicate_step(draw: st.DrawFn, doc: Any) -> Any:
    steps = _steps(doc)
    if steps:
        i = draw(st.integers(0, len(steps) - 1))
        steps.insert(draw(st.integers(0, len(steps))), copy.deepcopy(steps[i]))
    return doc


def _ref_sites(doc: Any) -> list[Path_]:
    sites: list[Path_] = []
    for i, s in enumerate(_steps(doc)):
        if not isinstance(s, dict):
            continue
        if "from" in s:
            sites.append(("steps", i, "from"))
        for j, e in enumerate(s.get("layers") if isinstance(s.get("layers"), list) else []):
            if isinstance(e, dict) and "from" in e:
                sites.append(("steps", i, "layers", j, "from"))
    out = doc.get("output") if isinstance(doc, dict) else None
    if isinstance(out, dict):
        sites += [("output", k) for k in ("model", "config") if k in out]
    return sites


def m_reference(draw: st.DrawFn, doc: Any) -> Any:
    """An unknown name, a near miss, the step itself or a later step (a cycle)."""
    sites = _ref_sites(doc)
    if not sites:
        return doc
    site = draw(st.sampled_from(sites))
    known = _all_names(doc) or ["tiny"]
    choice = draw(st.integers(0, 3))
    if choice == 0:
        value = draw(names)
    elif choice == 1:
        value = draw(st.sampled_from(near_misses(draw(st.sampled_from(known))) or ["x"]))
    elif choice == 2 and site[0] == "steps":
        step_names = [s.get("name") for s in _steps(doc)[site[1]:] if isinstance(s, dict)]
        value = draw(st.sampled_from(step_names)) if step_names else "x"
    else:
        value = draw(st.sampled_from(known))
    return set_at(doc, site, value)


def m_cycle(draw: st.DrawFn, doc: Any) -> Any:
    """Make two or more steps refer to each other in a ring."""
    steps = [s for s in _steps(doc) if isinstance(s, dict) and isinstance(s.get("name"), str)]
    if len(steps) < 1:
        return doc
    ring = draw(st.lists(st.sampled_from(range(len(steps))), min_size=1, max_size=3, unique=True))
    for a, b in zip(ring, ring[1:] + ring[:1], strict=True):
        steps[a]["from"] = steps[b]["name"]
    return doc


def m_nest(draw: st.DrawFn, doc: Any) -> Any:
    p = _pick_path(draw, doc)
    if p is None:
        return doc
    value = get_at(doc, p)
    for _ in range(draw(st.sampled_from([1, 2, 5, 30, 100]))):
        value = [value] if draw(st.booleans()) else {"from": value}
    return set_at(doc, p, value)


def m_chain(draw: st.DrawFn, doc: Any) -> Any:
    """Replace the steps with a chain s0 <- s1 <- ... listed in a random order."""
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, dict) or not models:
        return doc
    n = draw(st.sampled_from([2, 3, 10, 60]))
    first = draw(st.sampled_from(list(models)))
    chain = [{"name": f"c{i}", "op": "layers", "from": first if i == 0 else f"c{i - 1}",
              "layers": [draw(st.sampled_from(["range(0,8)", "range(1,8)", 0, "range(0,8,2)"]))]}
             for i in range(n)]
    order = draw(st.sampled_from(["forward", "reverse", "shuffle"]))
    if order == "reverse":
        chain.reverse()
    elif order == "shuffle":
        chain = draw(st.permutations(chain))
    doc["steps"] = chain
    if isinstance(doc.get("output"), dict):
        doc["output"].pop("model", None)
        doc["output"].pop("config", None)
    return doc


def m_version(draw: st.DrawFn, doc: Any) -> Any:
    if isinstance(doc, dict):
        doc["recipekit"] = draw(st.sampled_from([2, 0, "1", 1.0, True, None, [1], "v1", -1]))
    return doc


def m_root(draw: st.DrawFn, doc: Any) -> Any:
    return draw(st.sampled_from([None, [], [doc], "recipekit: 1", 1, True, {}]))


MUTATIONS = [m_drop, m_unknown_key, m_rename_key, m_swap_type, m_number, m_string,
             m_duplicate_step, m_reference, m_cycle, m_nest, m_chain, m_version, m_root]


@st.composite
def mutated_documents(draw: st.DrawFn, abs_models: tuple[str, ...] = (),
                      max_mutations: int = 3) -> Any:
    doc = draw(recipe_documents(abs_models))
    n = draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))
    for _ in range(min(n, max_mutations)):
        # m_root rarely: it throws the whole document away
        op = draw(st.sampled_from(MUTATIONS[:-1] * 8 + MUTATIONS[-1:]))
        doc = op(draw, doc)
    return doc


# ---------------------------------------------------------------------------------------------
# Files


@dataclass(frozen=True)
class RecipeFile:
    """What a case writes: a file name and its bytes, and how it was made (for reports)."""

    name: str
    data: bytes
    origin: str

    def write(self, directory: Path) -> Path:
        path = directory / self.name
        path.write_bytes(self.data)
        return path


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # lone surrogates become invalid UTF-8


@st.composite
def serialized(draw: st.DrawFn, doc: Any, origin: str = "generated") -> RecipeFile:
    """``doc`` as YAML (block, flow or mixed style) or JSON, under a plausible file name."""
    fmt = draw(st.sampled_from(["yaml", "yaml", "json"]))
    if fmt == "yaml":
        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=draw(st.booleans()),
                              default_flow_style=draw(st.sampled_from([False, True, None])),
                              width=draw(st.sampled_from([80, 20, 10**6])),
                              indent=draw(st.sampled_from([2, 4])))
        name = draw(st.sampled_from(["recipe.yaml", "recipe.yaml", "recipe.yml", "recipe.YAML",
                                     "recipe"]))
    else:
        text = json.dumps(doc, indent=draw(st.sampled_from([None, 2, 0])),
                          ensure_ascii=draw(st.booleans()))
        name = draw(st.sampled_from(["recipe.json", "recipe.json", "recipe.JSON",
                                     "recipe.yaml"]))
    return RecipeFile(name, _encode(text), f"{origin}/{fmt}")


# ---------------------------------------------------------------------------------------------
# Text- and byte-level mutations

SNIPPETS = [
    "&a ", "*a", "<<: *a\n", "!!python/object/apply:os.system ['true']", "!!binary aGVsbG8=",
    "!!set {a}", "!!timestamp 2001-12-14", "!custom x", "? [a]\n: b\n", "? a\n", "---\n",
    "...\n", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "@", "`", "{", "}", "[", "]", ":", ": ",
    "- ", "-", "# comment", "'", '"', "\\", "\t", "\x00", "\ufeff", "\r", "\x85", "\u2028",
    "\x1b", "0b_", "._", "0x_", "0o", "9" * 5000, "0x" + "f" * 5000, "2024-01-01", "1e400",
    ".inf", "-.inf", ".nan", "~", "null", "yes", "on", "0o17", "017", "1:30", "é", "\u202e",
    "range(0," + "9" * 40 + ")", "| \n  x\n", "> \n  x\n", "!!str ", "!!int ", "!!float ",
    "!!map ", "!!seq ", "!!null ", "!!bool ", "&", "*", "*nope", "=", "<<", " #", ",", "||",
]


def _bomb(levels: int) -> str:
    lines = ["recipekit: 1", "models: {tiny: ./model}", "l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


WHOLE_TEXTS = [
    _bomb(4), _bomb(9),
    "recipekit: 1\nmodels: &m {a: *m}\n",
    "recipekit: 1\nmodels: {tiny: ./model}\nsteps: &s [*s]\n",
    "recipekit: 1\nx: " + "[" * 200 + "]" * 200 + "\n",
    "recipekit: 1\nx: " + "[" * 500 + "]" * 500 + "\n",
    "recipekit: 1\nx: " + "{a: " * 500 + "1" + "}" * 500 + "\n",
    "".join("  " * i + f"k{i}:\n" for i in range(600)),
    '{"recipekit": 1, "x": ' + "[" * 700 + "]" * 700 + "}",
    "", "\n", "#\n", "---\n", "--- |\n  text\n", "[]", "{}", "null", "1", '"recipekit"',
    "recipekit: 1\n---\nrecipekit: 1\n", "\ufeffrecipekit: 1\nmodels: {tiny: ./model}\n",
]


@st.composite
def text_mutations(draw: st.DrawFn, text: str, max_mutations: int = 4) -> str:
    for _ in range(draw(st.integers(1, max_mutations))):
        lines = text.split("\n")
        op = draw(st.integers(0, 11))
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        j = draw(st.integers(0, max(len(lines) - 1, 0)))
        pos = draw(st.integers(0, len(text)))
        if op == 0 and lines:  # delete a line
            del lines[i]
        elif op == 1 and lines:  # duplicate a line (duplicate keys, steps)
            lines.insert(j, lines[i])
        elif op == 2 and lines:  # swap two lines
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 3 and lines:  # change indentation
            delta = draw(st.sampled_from([-4, -2, -1, 1, 2, 4]))
            stripped = lines[i].lstrip(" ")
            indent = max(len(lines[i]) - len(stripped) + delta, 0)
            lines[i] = " " * indent + stripped
        elif op == 4:  # a tab
            text = text[:pos] + "\t" + text[pos:]
            continue
        elif op == 5:  # truncate
            text = text[:pos]
            continue
        elif op in (6, 7):  # insert a YAML special
            text = text[:pos] + draw(st.sampled_from(SNIPPETS)) + text[pos:]
            continue
        elif op == 8:  # delete a span
            text = text[:pos] + text[pos + draw(st.integers(1, 20)):]
            continue
        elif op == 9:  # replace a character
            text = text[:pos] + draw(st.characters()) + text[pos + 1:]
            continue
        elif op == 10:  # CRLF / CR line ends
            text = text.replace("\n", draw(st.sampled_from(["\r\n", "\r"])))
            continue
        else:  # unquote everything
            text = text.replace('"', "").replace("'", "")
            continue
        text = "\n".join(lines)
    return text


@st.composite
def byte_mutations(draw: st.DrawFn, data: bytes) -> bytes:
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.integers(0, 2))
        if op == 0:
            data = data[:pos] + draw(st.binary(min_size=1, max_size=4)) + data[pos:]
        elif op == 1 and data:
            pos = min(pos, len(data) - 1)
            data = data[:pos] + bytes([data[pos] ^ (1 << draw(st.integers(0, 7)))]) + data[
                pos + 1:]
        else:
            data = data[:pos] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80",
                                                      b"\xef\xbb\xbf", b"\x00"])) + data[pos:]
    return data


@st.composite
def seed_recipe_files(draw: st.DrawFn) -> RecipeFile:
    """One of the recipes in recipes/, mutated line by line, character or byte."""
    src = draw(st.sampled_from(SEED_RECIPES))
    text = src.read_text(encoding="utf-8")
    level = draw(st.sampled_from(["text", "text", "text", "bytes", "both", "as-is"]))
    if level in ("text", "both"):
        text = draw(text_mutations(text))
    data = _encode(text)
    if level in ("bytes", "both"):
        data = draw(byte_mutations(data))
    return RecipeFile(src.name, data, f"recipes/{src.name}/{level}")


@st.composite
def recipe_files(draw: st.DrawFn, abs_models: tuple[str, ...] = ()) -> RecipeFile:
    """Every kind of case: generated documents (mutated, then sometimes text-mutated), the
    recipes in recipes/ mutated, and a few whole texts (alias bombs, deep nesting)."""
    kind = draw(st.integers(0, 19))
    if kind < 11:
        return draw(serialized(draw(mutated_documents(abs_models))))
    if kind < 13:
        f = draw(serialized(draw(mutated_documents(abs_models)), origin="generated+text"))
        text = f.data.decode("utf-8", "surrogatepass")
        return RecipeFile(f.name, _encode(draw(text_mutations(text, 2))), f.origin)
    if kind < 19:
        return draw(seed_recipe_files())
    text = draw(st.sampled_from(WHOLE_TEXTS))
    return RecipeFile(draw(st.sampled_from(["recipe.yaml", "recipe.json"])), _encode(text),
                      "whole-text")

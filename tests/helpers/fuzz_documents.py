"""Fuzzing recipes, part 1: the atoms (names, odd strings, numbers, keys and their near misses)
and whole recipe documents generated from the structure of `schemas/recipe.schema.json`,
biased towards recipes that load. The mutations are in `fuzz_mutations`, the oracle in
`fuzz_oracle` (whose docstring describes the fuzzer as a whole).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
RECIPES_DIR = ROOT / "recipes"
SEED_RECIPES = sorted(p for p in RECIPES_DIR.iterdir()
                      if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
TINY_LAYERS = 8  # both the `model` fixture and recipes/models/* have 8 layers
LAYER_PREFIX = "model.layers."

# ---------------------------------------------------------------------------------------------
# Atoms

COMMON_NAMES = ["tiny", "a", "b", "base", "up", "franken", "pruned", "s1", "s2", "2024", "007",
                "1e3", "x.y", "a-b", "_", "A_1", "null", "true", "yes", "0x10", "v1.0"]
names = st.one_of(
    st.sampled_from(COMMON_NAMES),
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,8}", fullmatch=True),
)

ODD_STRINGS = [
    "", " ", ".", "..", "../", "../../etc", "/", "a b", "a\x00b", "\x00", "é", "名前", "\u202e",
    "a/b", "org/name", "~", "~nosuchuser/x", "~/x", "-x", ".x", "x" * 300, "\t", "\n", " \n ",
    "range(0,8)", "null", "~", "true", "1e3", "0x10", "2024-01-01", "*a", "&a", "!!str", "# c",
    "'", '"', "\\", "\ud800", "\U0001f600", "a\u0301", "\ufeff", "\r\n", "${HOME}", "$(true)",
    "%s%n", "{}", "[]", "- x", "key: value", "model.layers", "lm_head.weight", "\x7f", "\x1b[31m",
]
odd_strings = st.one_of(st.sampled_from(ODD_STRINGS), st.text(max_size=12))

HUGE_INTS = [2**31, 2**32 + 1, 2**63, 2**64, 10**18, 10**30, 10**100, -(2**63), -(10**30)]
NUMBERS = [0, -1, -7, 1, 7, 8, 9, 255, 0.0, -0.0, 0.5, 3.0, 8.0, -1.5, 1e300, -1e300, 1e-300,
           float("inf"), float("-inf"), float("nan"), True, False, *HUGE_INTS]
numbers = st.one_of(st.sampled_from(NUMBERS), st.integers(), st.floats())

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(),
                     st.text(max_size=8), st.sampled_from(ODD_STRINGS))
json_values = st.recursive(
    _scalars,
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=6), c,
                                                                 max_size=3)),
    max_leaves=6,
)

# Keys the schema knows, and near-misses of them (did-you-mean hints, case, separators).
KNOWN_KEYS = ["recipekit", "name", "description", "models", "steps", "output", "op", "from",
              "layers", "range", "path", "hub", "revision", "layer_prefix", "model", "dtype",
              "shard_size", "config", "alpha", "adapters", "method", "base", "weight"]


def near_misses(key: str) -> list[str]:
    out = {key.upper(), key.capitalize(), key + "s", key[:-1], key + " ", " " + key,
           key.replace("_", "-"), key.replace("_", ""), key + "\u200b"}
    for i in range(len(key) - 1):
        out.add(key[:i] + key[i + 1] + key[i] + key[i + 2:])  # swap two letters
    for i in range(len(key)):
        out.add(key[:i] + key[i + 1:])  # drop a letter
    out.discard(key)
    out.discard("")
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# Documents from the schema's structure

GOOD_SOURCES: list[Any] = [
    "./model", "model", "./model/", "./model/../model", "./models/tiny-llama",
    "models/tiny-llama-b", {"path": "./model"}, {"path": "model/"},
    {"path": "./model", "layer_prefix": "model.layers"},
    {"path": "./models/tiny-llama", "layer_prefix": "model.layers."},
]
BAD_SOURCES: list[Any] = [
    "./missing", "org/name", "~nosuchuser/x", "/", ".", "..", "./model/config.json",
    "./models", "./model\x00x", "./model\ud800", "",
    {"hub": "org/name"}, {"hub": "org/name", "revision": "v1.0"}, {"hub": "a..b/c"},
    {"hub": "org/name", "revision": "0" * 40}, {"hub": "org/name", "revision": 20240101},
    {"path": "./model", "layer_prefix": "nope"}, {"path": "./model", "layer_prefix": "model"},
    {"path": "./model", "layer_prefix": "lm_head"}, {"path": "./model", "layer_prefix": "."},
    {"path": ""}, {"path": "./model", "hub": "org/x"}, {"path": "./model", "revision": "main"},
]

#: Relative output paths that stay inside the case directory (run writes there) or go through
#: its `model` link (run then writes to -o instead).
ODD_OUTPUT_PATHS = ["out\x00x", "x" * 300, "out/" + "x" * 255, "é/名前", "-x", ".x", " ", "model",
                    "model/x", "out\n", "recipe.yaml", "recipe.json", "${HOME}", "out/./.", "\\"]
DTYPES = ["float32", "float16", "bfloat16", "float64"]
BAD_DTYPES = ["bf16", "fp16", "int8", "float8_e4m3fn", "", "FLOAT32", "half", "torch.float16"]
SIZES: list[Any] = [1, 100, 4096, 100_000, 10**12, "1", "100KB", "5GB", "2GiB", "1.5MB",
                    " 10 kb ", "64k", "100 B"]
BAD_SIZES: list[Any] = [0, -1, 0.5, "0", "0.1", "1e3", "-1", "5XB", "9" * 400, "", "GB",
                        "5 G B", 1e400, True, None, [1], {"a": 1}]

small_index = st.integers(0, TINY_LAYERS - 1)
layer_index = st.one_of(small_index, small_index, small_index, st.integers(-3, 3 * TINY_LAYERS),
                        st.sampled_from(HUGE_INTS))
range_step = st.one_of(st.just(1), st.just(1), st.integers(-3, 4), st.sampled_from(HUGE_INTS))

BAD_RANGE_STRINGS = [
    "range(1)", "range()", "range(0,8,)", "range(0, 8", "range(a,b)", "range(0.5,2)",
    "range(+1,3)", "RANGE(0,2)", "range(0,2)x", "range(0,2,1,1)", "range(0_1,3)", "range (0,2)",
    "range(0,\n2)", "range(0,2)\n", "range(１,３)", "range(0,2", "range(,)", "range(-0,2)",
    "range(2,0,-1)", "range(0,8,0)", "range(3,3)", "range(5,1)", "range(0," + "9" * 40 + ")",
    "range(0," + "9" * 5000 + ")", "range(0,8)" * 2, "__import__('os')", "0", "7", "-1",
]


@st.composite
def range_strings(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(BAD_RANGE_STRINGS))
    if draw(st.booleans()):
        a = draw(st.integers(0, TINY_LAYERS - 1))
        b = draw(st.integers(a + 1, TINY_LAYERS))
    else:
        a, b = draw(layer_index), draw(layer_index)
    template = draw(st.sampled_from(["range({a},{b})", "range({a}, {b})", " range ( {a} , {b} ) ",
                                     "range({a},{b},{s})", "range({a}, {b}, {s})"]))
    return template.format(a=a, b=b, s=draw(range_step))


@st.composite
def layer_selectors(draw: st.DrawFn) -> Any:
    return draw(st.one_of(layer_index, range_strings()))


@st.composite
def layer_entries(draw: st.DrawFn, refs: list[str]) -> Any:
    kind = draw(st.integers(0, 5))
    if kind <= 1:
        return draw(layer_index)
    if kind <= 3:
        return draw(range_strings())
    ref = draw(st.sampled_from(refs))
    if kind == 4:
        if draw(st.booleans()):
            a = draw(st.integers(0, TINY_LAYERS - 1))
            rng = [a, draw(st.integers(a + 1, TINY_LAYERS))]
        else:
            rng = [draw(layer_index), draw(layer_index)]
        return {"from": ref, "range": rng}
    return {"from": ref, "layers": draw(st.lists(layer_selectors(), min_size=1, max_size=3))}


@st.composite
def valid_layer_entries(draw: st.DrawFn, counts: dict[str, int], src: str
                        ) -> tuple[Any, int]:
    """An entry that selects existing layers (of `src`, or of another name), and its length."""
    kind = draw(st.integers(0, 4))
    other = draw(st.sampled_from(sorted(counts))) if kind >= 3 else src
    n = counts[other]
    a = draw(st.integers(0, n - 1))
    b = draw(st.integers(a + 1, min(n, a + 8)))
    if kind == 0:
        return a, 1
    if kind == 1:
        form = draw(st.sampled_from(["fwd", "step2", "rev"]))
        if form == "step2":
            return f"range({a},{b},2)", len(range(a, b, 2))
        if form == "rev" and a >= 1:
            return f"range({b - 1}, {a - 1}, -1)", b - a
        return draw(st.sampled_from(["range({a},{b})", "range({a}, {b})"])).format(a=a, b=b), b - a
    if kind == 2:
        return f" range( {a} ,{b} ) ", b - a
    if kind == 3:
        return {"from": other, "range": [a, b]}, b - a
    return {"from": other, "layers": [a, f"range({a},{b})"]}, 1 + b - a


@st.composite
def recipe_documents(draw: st.DrawFn, abs_models: tuple[str, ...] = ()) -> dict[str, Any]:
    """A recipe document whose models are mostly the case's tiny checkpoint: half of them
    valid by construction (every index in range), the others with anything the schema allows
    and a little it does not.

    ``abs_models``: absolute paths of the tiny checkpoint, used as model sources too.
    """
    valid = draw(st.booleans())
    good = GOOD_SOURCES + list(abs_models) + [{"path": p} for p in abs_models]
    n_models = draw(st.integers(1, 3))
    model_names = draw(st.lists(names, min_size=n_models, max_size=n_models, unique=True))
    models = {}
    for n in model_names:
        bad = not valid and draw(st.integers(0, 5)) == 0
        models[n] = copy.deepcopy(draw(st.sampled_from(BAD_SOURCES if bad else good)))

    n_steps = draw(st.integers(0, 4))
    step_names = draw(st.lists(names.filter(lambda n: n not in model_names), min_size=n_steps,
                               max_size=n_steps, unique=True))
    steps = []
    counts = dict.fromkeys(model_names, TINY_LAYERS)
    for i, sname in enumerate(step_names):
        earlier = model_names + step_names[:i]
        if valid:
            src = draw(st.sampled_from(earlier))
            layers: list[Any] = []
            total = 0
            for _ in range(draw(st.integers(1, 4))):
                entry, k = draw(valid_layer_entries({n: counts[n] for n in earlier}, src))
                layers.append(entry)
                total += k
                if total > 3 * TINY_LAYERS:
                    break
            counts[sname] = total
            steps.append({"name": sname, "op": "layers", "from": src, "layers": layers})
            continue
        refs = earlier if draw(st.integers(0, 7)) else model_names + step_names
        steps.append({
            "name": sname,
            "op": "layers",
            "from": draw(st.sampled_from(refs)),
            "layers": draw(st.lists(layer_entries(refs), min_size=1, max_size=4)),
        })
    if valid and len(steps) > 1 and draw(st.integers(0, 3)) == 0:
        steps = draw(st.permutations(steps))  # steps may come in any order
    doc: dict[str, Any] = {"recipekit": 1}
    if draw(st.integers(0, 3)) == 0:
        doc["name"] = draw(st.one_of(names, odd_strings))
    if draw(st.integers(0, 5)) == 0:
        doc["description"] = draw(st.text(max_size=40))
    doc["models"] = models
    if steps or draw(st.booleans()):
        doc["steps"] = steps
    if draw(st.booleans()) or not steps:
        out: dict[str, Any] = {}
        everything = model_names + step_names
        if draw(st.booleans()):
            paths = ["./out", "out/x", "out dir", "./out/../out2", "../out", "~/out", "."]
            out["path"] = draw(st.sampled_from(paths + ODD_OUTPUT_PATHS))
        if draw(st.booleans()) or not steps:
            out["model"] = draw(st.sampled_from(everything))
        if draw(st.booleans()):
            out["dtype"] = draw(st.sampled_from(DTYPES + ([] if valid else BAD_DTYPES[:1])))
        if draw(st.booleans()):
            out["shard_size"] = draw(st.sampled_from(SIZES + ([] if valid else BAD_SIZES[:2])))
        if draw(st.integers(0, 3)) == 0:
            out["config"] = draw(st.sampled_from(everything))
        doc["output"] = out
    if draw(st.integers(0, 9)) == 0:  # key order is not significant
        keys = draw(st.permutations(list(doc)))
        doc = {k: doc[k] for k in keys}
    return doc

"""Fuzzing the side commands and adapter configs: hypothesis strategies and the oracle, shared
by tests/e2e/test_fuzz_side_commands.py (a few hundred cases in CI) and bench/fuzz_soak.py
(``--side``, thousands).

Inputs (`SideInputs`, built once): the tiny Llama, a PEFT LoRA adapter of it (made by PEFT),
a pickle copy for `convert`, a finished `run` output for `verify`, a mergekit config. A case
copies the ones it needs into its own directory and damages them: byte flips, truncation and
splices of safetensors, pickle and JSON files, fuzzed JSON values (NaN, ±inf, 400-digit and
negative numbers, wrong types, control characters, ``../`` and absolute paths, catastrophic
regexes) in config.json, indexes, recipekit.json and adapter_config.json, fuzzed mergekit
YAML. The oracle (`check_side`), for `convert`, `lock`, `import-mergekit`, `diff`, `verify`
and `inspect`:

* the exit code is 0, 1 or 2; no exception escapes, no "Traceback", no "internal error";
* nothing is created, changed or deleted in the case directory except the command's own
  output (convert's destination, lock's ``.lock`` file, import-mergekit's ``-o`` file);
* a case ends within its time limit (a catastrophic regex is a hang).

For adapter configs (`check_adapter_fold`): folding the fuzzed adapter into the tiny model
either succeeds with exit 0 and an output, or exits 2 with a message naming adapter_config.json
or located at the recipe's adapter entry (``adapters.a:``, where a config that contradicts
its weights or names another PEFT type is reported); what `validate` can find is exit 2.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from tests.helpers.fuzz_oracle import OracleViolation, time_limit

# ---------------------------------------------------------------------------------------------
# Values


def odd_numbers() -> st.SearchStrategy[Any]:
    return st.sampled_from([math.nan, math.inf, -math.inf, -1, 0, 0.5, 1e308, -1e-320,
                            2**64, 10**400, 3.0, True, False])


def odd_strings() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["", "../secret", "/etc/passwd", "a\x00b", "\x1b]0;t\x07", "\u202e",
                         "(.*.*)*q_projX", "(a+)+$", "[", "*", "q_proj", "v_proj", ".*",
                         "model.layers.0.self_attn.q_proj", "x" * 5000, "9" * 400]),
        st.text(max_size=12))


def json_values(depth: int = 2) -> st.SearchStrategy[Any]:
    """Any JSON-ish value, biased to the odd: NaN and ±inf (Python's json writes them), huge,
    negative and integral-float numbers, hostile strings, lists and objects of them."""
    base = st.one_of(st.none(), odd_numbers(), st.integers(-5, 70), odd_strings())
    if depth <= 0:
        return base
    inner = json_values(depth - 1)
    return st.one_of(base, st.lists(inner, max_size=4),
                     st.dictionaries(odd_strings(), inner, max_size=4))


def mutated_json(doc: dict[str, Any], keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """``doc`` with one to four keys (mostly from ``keys``) set to fuzzed values or dropped."""
    @st.composite
    def build(draw: Any) -> dict[str, Any]:
        out = dict(doc)
        for _ in range(draw(st.integers(1, 4))):
            key = draw(st.one_of(st.sampled_from(keys), odd_strings()))
            if draw(st.integers(0, 5)) == 0:
                out.pop(key, None)
            else:
                out[key] = draw(json_values())
        return out
    return build()


def mutated_bytes(data: bytes) -> st.SearchStrategy[bytes]:
    """Byte flips, truncation, a spliced header length, or an appended tail."""
    @st.composite
    def build(draw: Any) -> bytes:
        buf = bytearray(data)
        kind = draw(st.integers(0, 3))
        if kind == 0 and buf:
            for _ in range(draw(st.integers(1, 8))):
                i = draw(st.integers(0, len(buf) - 1))
                buf[i] = draw(st.integers(0, 255))
        elif kind == 1:
            del buf[draw(st.integers(0, len(buf))):]
        elif kind == 2 and len(buf) >= 8:
            buf[:8] = draw(st.sampled_from([0, 1, 7, 2**63 - 1, 2**64 - 1, len(buf), 100_000_001])
                           ).to_bytes(8, "little")
        else:
            buf += draw(st.binary(max_size=64))
        return bytes(buf)
    return build()


def dump(value: Any) -> str:
    """JSON as Python writes it (NaN and Infinity included: files in the wild have them)."""
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class SideInputs:
    """Pristine inputs, copied into each case directory before being damaged."""

    model: Path  # tiny Llama, model.safetensors + config.json
    adapter: Path  # PEFT LoRA adapter of `model`
    pickled: Path  # `model` as pytorch_model.bin + config.json
    output: Path  # a finished `recipekit run` output
    mergekit: dict[str, Any]  # a mergekit config over `model`


def make_side_inputs(root: Path, tiny_llama: Path) -> SideInputs:
    """Build the pristine inputs under ``root`` (PEFT makes the adapter, `run` the output)."""
    import torch
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from recipekit.cli import app

    from tests.helpers.adapter_builders import make_adapter
    from tests.helpers.recipes import solar_recipe, write_recipe

    model = root / "model"
    shutil.copytree(tiny_llama, model)
    adapter = make_adapter("llama", model, root / "adapter", r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj"])
    pickled = root / "pickled"
    pickled.mkdir()
    torch.save(load_file(model / "model.safetensors"), pickled / "pytorch_model.bin")
    shutil.copy(model / "config.json", pickled / "config.json")
    recipe = write_recipe(root, solar_recipe(model, output="  path: ./output"))
    result = CliRunner().invoke(app, ["run", "-q", "--no-fsync", str(recipe)])
    assert result.exit_code == 0, result.output
    mergekit = {"merge_method": "linear", "dtype": "float32",
                "models": [{"model": str(model), "parameters": {"weight": 0.5}},
                           {"model": str(model), "parameters": {"weight": 0.5}}]}
    return SideInputs(model, adapter, pickled, root / "output", mergekit)


# ---------------------------------------------------------------------------------------------
# Cases: (command line, files the command may write)

COMMANDS = ("convert", "lock", "import-mergekit", "diff", "verify", "inspect")


@st.composite
def side_cases(draw: Any, inputs: SideInputs, case: Path) -> tuple[list[str], list[Path]]:
    """Damage copies of the inputs in ``case`` and return the command to run on them."""
    command = draw(st.sampled_from(COMMANDS))
    if command == "convert":
        src = _copy(inputs.pickled, case / "src")
        _damage_one(draw, src, {"pytorch_model.bin": None, "config.json": ["model_type",
                                                                           "architectures"]})
        if draw(st.booleans()):
            index = {"weight_map": draw(st.dictionaries(odd_strings(), json_values(0),
                                                        max_size=3))}
            (src / "pytorch_model.bin.index.json").write_text(dump(index))
        return ["convert", "--allow-pickle", str(src), str(case / "dst")], [case / "dst"]
    if command in ("lock", "import-mergekit"):
        config = draw(mutated_json(inputs.mergekit, ["merge_method", "models", "slices",
                                                     "base_model", "parameters", "dtype",
                                                     "tokenizer_source"]))
        text = dump(config) if draw(st.booleans()) else _yaml(config)
        if command == "lock":
            recipe = case / "recipe.yaml"
            recipe.write_text(text if draw(st.booleans()) else _lockable(inputs, draw))
            return ["lock", str(recipe)], [case / "recipe.lock.json"]
        (case / "merge.yml").write_text(text)
        return ["import-mergekit", str(case / "merge.yml"), "-o", str(case / "r.yaml")], [
            case / "r.yaml"]
    if command == "verify":
        out = _copy(inputs.output, case / "output")
        _damage_one(draw, out, {"model.safetensors": None, "config.json": ["num_hidden_layers"],
                                "recipekit.json": ["plan_hash", "files", "recipe", "version"]})
        return ["verify", str(out)], []
    model = _copy(inputs.model, case / "a")
    _damage_one(draw, model, {"model.safetensors": None,
                              "config.json": ["num_hidden_layers", "architectures",
                                              "model_type", "hidden_size"]})
    if command == "inspect":
        return ["inspect", str(model), "-q", *draw(st.sampled_from([[], ["--headers-only"],
                                                                     ["--json"]]))], []
    return ["diff", str(inputs.model), str(model), "-q", *draw(st.sampled_from([[], ["--json"]]))
            ], []


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _damage_one(draw: Any, folder: Path, files: dict[str, list[str] | None]) -> None:
    """Damage one file: bytes for weights, fuzzed values for JSON files (keys given)."""
    name = draw(st.sampled_from(sorted(files)))
    path = folder / name
    if files[name] is None:
        path.write_bytes(draw(mutated_bytes(path.read_bytes())))
    else:
        doc = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(dump(draw(mutated_json(doc, files[name]))))


def _yaml(config: dict[str, Any]) -> str:
    try:
        return yaml.safe_dump(config, allow_unicode=True)
    except yaml.YAMLError:
        return dump(config)


def _lockable(inputs: SideInputs, draw: Any) -> str:
    """A recipe over the tiny model with a fuzzed layer list or output (what `lock` reads)."""
    from tests.helpers.recipes import solar_recipe

    return solar_recipe(inputs.model, layers=dump(draw(st.lists(json_values(0), max_size=3))))


# ---------------------------------------------------------------------------------------------
# The oracle


def snapshot(folder: Path) -> dict[str, tuple[str, bytes | str]]:
    """Every entry under ``folder`` (not following links): kind and content hash or target."""
    out: dict[str, tuple[str, bytes | str]] = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = ("link", str(p.readlink()))
        elif p.is_file():
            out[rel] = ("file", hashlib.sha256(p.read_bytes()).digest())
        else:
            out[rel] = ("dir", "")
    return out


def invoke(runner: Any, app: Any, args: list[str], limit: float) -> tuple[int, str]:
    """Run one command in process; a violation for an escaping exception, a traceback, an
    internal error, an exit code other than 0/1/2, or a hang."""
    what = " ".join(args[:1])
    with time_limit(limit, what):
        result = runner.invoke(app, args, catch_exceptions=True)
    text = (result.stdout or "") + (result.stderr or "")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise OracleViolation(f"{what}: raised {type(result.exception).__name__}: "
                              f"{result.exception!r}")
    if result.exit_code not in (0, 1, 2):
        raise OracleViolation(f"{what}: exit code {result.exit_code}\n{text}")
    if "Traceback" in text or "internal error" in text:
        raise OracleViolation(f"{what}: {text}")
    return result.exit_code, text


#: Side-command bugs this fuzzer found that belong to issue 17 item 11 (internal errors for
#: ordinary conditions), fixed in parallel: counted, not failed (key returned). Remove once fixed.
KNOWN_OPEN_SIDE: dict[str, tuple[str, ...]] = {}


def check_side(runner: Any, app: Any, case: Path, args: list[str], writes: list[Path],
               limit: float = 60.0) -> int | str:
    """The side-command contract (module docstring) for one case; returns the exit code, or
    the `KNOWN_OPEN_SIDE` key of a known open bug the case met."""
    before = snapshot(case)
    try:
        code, _ = invoke(runner, app, args, limit)
    except OracleViolation as e:
        known = [k for k, signs in KNOWN_OPEN_SIDE.items() if any(s in str(e) for s in signs)]
        if known:
            return known[0]
        raise
    allowed = [str(w.relative_to(case)) for w in writes]
    after = snapshot(case)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)
                     and not any(k == a or k.startswith(a + "/") for a in allowed))
    if changed:
        raise OracleViolation(f"{args[0]} (exit {code}) changed files it does not own: "
                              f"{changed[:5]}")
    return code


ADAPTER_KEYS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules",
                "layers_to_transform", "layers_pattern", "use_dora", "use_rslora",
                "fan_in_fan_out", "modules_to_save", "peft_type", "bias", "task_type"]


def adapter_configs(inputs: SideInputs) -> st.SearchStrategy[dict[str, Any]]:
    doc = json.loads((inputs.adapter / "adapter_config.json").read_text())
    return mutated_json(doc, ADAPTER_KEYS)


#: Adapter-config bugs this fuzzer found whose fix belongs to issue 17 items 7 (ReDoS in
#: rank_pattern/alpha_pattern) and 8 (non-finite or non-numeric scalings) being fixed in
#: parallel: a case that meets one returns its key instead of failing (each is pinned by an
#: xfail test in tests/e2e/test_fuzz_side_commands.py). Remove an entry once fixed.
KNOWN_OPEN_ADAPTER: dict[str, tuple[str, ...]] = {}


def check_adapter_fold(runner: Any, app: Any, inputs: SideInputs, case: Path,
                       config: dict[str, Any], limit: float = 60.0) -> int | str:
    """Fold a copy of the adapter with ``config`` into the tiny model: exit 0 with an output,
    or exit 2 naming adapter_config.json or the adapter; nothing else. Returns the exit code,
    or the `KNOWN_OPEN_ADAPTER` key of a known open bug the case met."""
    from tests.helpers.recipes import write_recipe

    adapter = _copy(inputs.adapter, case / "adapter")
    (adapter / "adapter_config.json").write_text(dump(config))
    recipe = write_recipe(case, f"recipekit: 1\nmodels: {{base: {inputs.model}}}\n"
                          f"adapters: {{a: {adapter}}}\nsteps:\n"
                          "  - {name: f, op: adapters, from: base, adapters: [a]}\n"
                          "output: {path: ./out}\n")
    try:
        code, text = invoke(runner, app, ["run", "-q", "--no-fsync", str(recipe)], limit)
    except OracleViolation as e:
        known = [k for k, signs in KNOWN_OPEN_ADAPTER.items() if any(s in str(e) for s in signs)]
        if known:  # reported, fixed elsewhere (issue 17 items 7 and 8): counted, not failed
            return known[0]
        raise
    if code == 0:
        if not (case / "out" / "model.safetensors").is_file():
            raise OracleViolation(f"fold: exit 0 but no output\n{text}")
    elif code != 2 or not any(n in text for n in ("adapter_config.json", "adapters.a:",
                                                  "adapter 'a'")):
        raise OracleViolation(f"fold: exit {code}, not 2 naming the adapter\n{text}")
    return code

"""The op and merge-method registries, and the schema parts generated from them.

Oracle: the registries themselves (`recipekit.steps.OPS`, `recipekit.merge.METHODS`) against the
committed `schemas/recipe.schema.json`, and the loader and compiler reading them.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import recipekit.recipe.schema as recipe_module
from recipekit.merge import METHODS
from recipekit.ops.merge import KERNELS
from recipekit.recipe import step_references
from recipekit.steps import BUILDERS, OPS
from recipekit.steps.schema import SCHEMA_PATH, generate_schema, main, schema_text

ROOT = Path(__file__).resolve().parents[2]


def committed() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


class TestGeneratedSchema:
    """The committed schema equals what the registries generate (property 1 and 2 of issue 15)."""

    def test_committed_schema_is_current(self):
        assert SCHEMA_PATH == ROOT / "schemas" / "recipe.schema.json"
        assert SCHEMA_PATH.read_text() == schema_text(generate_schema(committed()))
        assert main(["--check"]) == 0

    def test_check_fails_on_a_stale_file_and_the_command_rewrites_it(self, tmp_path, capsys):
        stale = committed()
        stale["$defs"]["merge_step"]["properties"]["method"]["enum"].remove("nearswap")
        del stale["$defs"]["merge_step"]["x-recipekit-methods"]["ties"]
        stale["$defs"]["step"]["properties"]["op"]["enum"].append("frobnicate")
        path = tmp_path / "recipe.schema.json"
        path.write_text(json.dumps(stale, indent=2) + "\n")
        assert main(["--check", str(path)]) == 1
        assert "is stale: run `python -m recipekit.steps.schema`" in capsys.readouterr().err
        assert main([str(path)]) == 0
        assert path.read_text() == SCHEMA_PATH.read_text()

    def test_op_list_is_the_registry(self):
        step = committed()["$defs"]["step"]
        assert step["properties"]["op"]["enum"] == list(OPS)
        dispatch = {case["if"]["properties"]["op"]["const"]: case["then"]["$ref"]
                    for case in step["allOf"]}
        assert dispatch == {name: f"#/$defs/{op.schema}" for name, op in OPS.items()}

    def test_method_lists_are_the_registry(self):
        defs = committed()["$defs"]
        merge = defs[OPS["merge"].schema]
        assert merge["properties"]["method"]["enum"] == list(METHODS)
        assert list(merge["x-recipekit-methods"]) == list(METHODS)
        for name, spec in METHODS.items():
            table = merge["x-recipekit-methods"][name]
            assert table["base"] == spec.base
            assert {k: v["default"] for k, v in table["parameters"].items()} == {
                p.name: p.default for p in spec.params}
        every = {p.name for spec in METHODS.values() for p in spec.params}
        per_input = {p.name for spec in METHODS.values() for p in spec.params
                     if p.scope != "shared"}
        assert set(merge["properties"]["parameters"]["properties"]) == every
        assert set(defs["merge_input"]["oneOf"][1]["properties"]) == per_input | {"model"}

    def test_a_missing_definition_is_named(self, monkeypatch):
        monkeypatch.setitem(OPS, "merge", dataclasses.replace(OPS["merge"], schema="nowhere"))
        with pytest.raises(KeyError, match="no \\$defs entry for op\\(s\\) merge"):
            generate_schema(committed())


class TestOpRegistry:
    """Each op is declared once, in its module; the loader and compiler read the declaration."""

    def test_every_op_is_declared_in_its_module(self):
        assert list(OPS) == ["layers", "interpolate", "merge", "head", "reinit", "adapters",
                             "combine_adapters", "extract_lora", "coalesce", "decoalesce", "moe"]
        for name, op in OPS.items():
            assert op.name == name
            assert op.build.__module__.startswith("recipekit.steps.")
            assert BUILDERS[name] is op.build
        assert [n for n, op in OPS.items() if not op.models_only] == ["adapters", "moe"]

    def test_known_keys_follow_the_dispatch_not_the_name(self, monkeypatch):
        """Rename merge's definition: the loader still finds its keys through the registry."""
        schema = copy.deepcopy(committed())
        schema["$defs"]["merge_keys"] = schema["$defs"].pop("merge_step")
        monkeypatch.setitem(OPS, "merge", dataclasses.replace(OPS["merge"], schema="merge_keys"))
        renamed = generate_schema(schema)
        monkeypatch.setattr(recipe_module, "load_schema", lambda: renamed)
        doc = SimpleNamespace(data={"steps": [{"name": "m", "op": "merge"}]})
        keys = recipe_module._known_keys(doc, ("steps", 0))
        assert keys == list(committed()["$defs"]["merge_step"]["properties"])
        doc = SimpleNamespace(data={"steps": [{"name": "m", "op": "frobnicate"}]})
        assert recipe_module._known_keys(doc, ("steps", 0)) == ["name", "op"]


def name_samples(schema: dict, defs: dict, depth: int = 0) -> list:
    """Values of `schema` that hold the marker "X" at one model-name position each (every
    ``$ref: #/$defs/name`` reachable through refs, alternatives, items and properties)."""
    if depth > 8 or not isinstance(schema, dict):
        return []
    if schema.get("$ref") == "#/$defs/name":
        return ["X"]
    out: list = []
    if "$ref" in schema:
        out += name_samples(defs[schema["$ref"].split("/")[-1]], defs, depth + 1)
    for alternatives in ("oneOf", "anyOf", "allOf"):
        for alternative in schema.get(alternatives, []):
            out += name_samples(alternative, defs, depth + 1)
    for i, item in enumerate(schema.get("prefixItems", [])):
        out += [["P"] * i + [v] for v in name_samples(item, defs, depth + 1)]
    if isinstance(schema.get("items"), dict):
        out += [[v] for v in name_samples(schema["items"], defs, depth + 1)]
    for key, sub in schema.get("properties", {}).items():
        out += [{key: v} for v in name_samples(sub, defs, depth + 1)]
    return out


class TestReferences:
    """The keys where an op's schema names a model are the ones `step_references` walks, so a
    new op's model-valued key cannot silently escape name resolution and cycle checks."""

    def test_every_name_valued_key_is_a_reference(self):
        defs = committed()["$defs"]
        checked = []
        for name, op in OPS.items():
            for key, sub in defs[op.schema]["properties"].items():
                if key == "name":
                    continue  # the step's own name
                for value in name_samples(sub, defs):
                    found = [ref for ref, _ in step_references({"op": name, key: value})]
                    assert "X" in found, (name, key, value)
                    checked.append((name, key))
        assert len(checked) >= 19 and ("interpolate", "from") in checked


class TestMethodRegistry:
    """A merge method is defined once: contract, defaults, pair-ness, kernel."""

    def test_pair_methods_come_from_the_contract(self):
        assert {n for n, spec in METHODS.items() if spec.pair} == {"slerp", "nearswap",
                                                                   "arcee_fusion"}

    @pytest.mark.parametrize("module", ["recipekit/steps/merge.py",
                                        "recipekit/tools/mergekit_import.py"])
    def test_no_module_lists_method_names(self, module):
        """The merge step and the importer ask `MethodSpec.pair`, not a tuple of names."""
        tree = ast.parse((ROOT / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                listed = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                assert not {"slerp", "nearswap"} <= listed, (module, node.lineno)

    def test_every_method_has_its_kernel(self):
        assert set(KERNELS) == {spec.kernel for spec in METHODS.values()}
        for spec in METHODS.values():
            assert KERNELS[spec.kernel].__module__.startswith("recipekit.ops.")

    @pytest.mark.parametrize("name", [n for n in METHODS if METHODS[n].fixed
                                      or n == "task_arithmetic"])
    def test_task_arithmetic_defaults_are_the_contracts(self, name):
        """The named task-arithmetic kernels take their defaults from their MethodSpec only."""
        import inspect

        spec = METHODS[name]
        signature = inspect.signature(KERNELS[spec.kernel])
        defaults = {k: p.default for k, p in signature.parameters.items()
                    if p.default is not inspect.Parameter.empty}
        assert defaults == {p.kwarg: p.default for p in spec.params if not p.required}
        with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
            KERNELS[spec.kernel](None, [], weights=[], bogus=1,
                                 **({"generator": None} if spec.random else {}))

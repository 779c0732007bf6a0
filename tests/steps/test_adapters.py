"""The `adapters` op against PEFT 0.21 itself.

Oracle: adapters made with PEFT in the test (every trainable tensor perturbed: B ≠ 0, DoRA
magnitudes and saved copies ≠ the base), folded by recipekit, compared with PEFT's
`merge_and_unload` (every tensor within 1e-6 in fp32) and with PEFT's *unmerged* forward
(logits within 1e-5); weights ≠ 1 against PEFT's `set_scale`; tensors no adapter touches are
bit-identical to the base.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.adapter_builders import make_adapter, peft_merged
from tests.helpers.builders import load_model, make_model, read_tensors
from tests.helpers.recipes import write_recipe

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    "plain": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "rslora_patterns": ("llama", dict(
        r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "gate_proj"],
        rank_pattern={"model.layers.1.self_attn.q_proj": 4}, alpha_pattern={"gate_proj": 24})),
    "dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True,
                           target_modules=["q_proj", "v_proj", "gate_proj"])),
    "embedding_modules_to_save": ("llama", dict(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"],
        modules_to_save=["lm_head"])),
    # PEFT saves the embedding and lm_head base layers beside an embedding LoRA by default
    # (`save_embedding_layers="auto"`): copies of the base, not trained tensors
    "embedding_saved_base": ("llama", dict(r=4, lora_alpha=8,
                                           target_modules=["embed_tokens", "lm_head", "v_proj"])),
    "embedding_saved_base_b": ("llama", dict(r=2, lora_alpha=4,
                                             target_modules=["embed_tokens", "q_proj"])),
    "layers_to_transform": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                          layers_to_transform=[0])),
    # PEFT's own filters, which recipekit no longer re-applies (issue 16 item 2): `[]` is no
    # filter, a dotted layers_pattern is used in a regex, a full module name is always wrapped
    "layers_to_transform_empty": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                layers_to_transform=[])),
    "layers_pattern_dotted": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                            layers_to_transform=[1],
                                            layers_pattern="model.layers")),
    "full_name_and_layers_to_transform": ("llama", dict(
        r=4, lora_alpha=8, target_modules=["model.layers.1.self_attn.q_proj", "v_proj"],
        layers_to_transform=[0])),
    # pattern keys as PEFT matches them, through the bounded matcher (issue 17 item 7)
    "pattern_keys_regex": ("llama", dict(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"],
        rank_pattern={r"^.*\.q_proj$": 2, "model.layers.1.self_attn.v_proj": 4},
        alpha_pattern={r"layers\.[01]\.mlp\.gate_proj": 5, "v_proj": 12})),
    "lora_bias": ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                lora_bias=True)),
    "all_linear_float_alpha": ("llama", dict(r=4, lora_alpha=6.5, target_modules=LLAMA_ALL)),
    "gpt2_fan_in_fan_out_lora_only": ("gpt2", dict(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
        bias="lora_only")),
    "gpt2_dora": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                               fan_in_fan_out=True, use_dora=True)),
    "gpt2_bias_all": ("gpt2", dict(r=2, lora_alpha=4, target_modules=["c_fc"],
                                   fan_in_fan_out=True, bias="all")),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapter_bases")
    return {"llama": make_model("llama", root / "llama", layers=2, seed=3),
            "gpt2": make_model("gpt2", root / "gpt2", layers=2, seed=4),
            "qwen2": make_model("qwen2", root / "qwen2", layers=2, seed=5)}


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(family, bases[family], root / name, seed=i, **kw)
            for i, (name, (family, kw)) in enumerate(CASES.items())}


def fold(cli, tmp_path: Path, base: Path, uses: list[tuple[Path, float]],
         combine: str | None = None, extra: str = "") -> Path:
    """Run an `adapters` step folding ``uses`` (in order) into ``base``; return the output."""
    names = "\n".join(f"  a{i}: {p}" for i, (p, _) in enumerate(uses))
    entries = ", ".join(f"{{use: a{i}, weight: {w}}}" for i, (_, w) in enumerate(uses))
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        models:
          base: {base}
        adapters:
        {names}
        steps:
          - name: folded
            op: adapters
            from: base
            adapters: [{entries}]
        {"    combine: " + combine if combine else ""}
        {extra}
        output:
          path: ./out
        """.replace("\n        ", "\n").replace("\n  a", "\n  a"))
    result = cli("run", recipe, "-q")
    assert result.exit_code == 0, result.output
    return tmp_path / "out"


def assert_matches_peft(family: str, base: Path, out: Path, uses: list[tuple[Path, float]]):
    ours = read_tensors(out)
    ref, logits = peft_merged(family, base, uses)
    original = read_tensors(base)
    assert set(ours) == set(original)
    for name, tensor in ours.items():
        assert tensor.dtype == original[name].dtype
        diff = (tensor - ref[name]).abs().max().item()
        assert diff <= 1e-6, (name, diff)
    changed = {n for n in ours if not torch.equal(ours[n], original[n])}
    assert changed, "the adapter changed nothing"
    for name in set(ours) - changed:  # untouched tensors: bit for bit
        assert torch.equal(ours[name], original[name])
    model = load_model(family, out).eval()
    ids = torch.arange(24).reshape(2, 12) % 100
    with torch.no_grad():
        folded = model(input_ids=ids).logits
    assert (folded - logits).abs().max().item() <= 1e-5
    return changed


@pytest.mark.parametrize("case", list(CASES))
def test_single_adapter_equals_peft(cli, tmp_path, bases, adapters, case):
    family = CASES[case][0]
    uses = [(adapters[case], 1.0)]
    out = fold(cli, tmp_path, bases[family], uses)
    changed = assert_matches_peft(family, bases[family], out, uses)
    if case == "layers_to_transform":
        assert changed == {"model.layers.0.self_attn.q_proj.weight"}
    if case == "layers_to_transform_empty":
        assert changed == {f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)}
    if case == "layers_pattern_dotted":
        assert changed == {"model.layers.1.self_attn.q_proj.weight"}
    if case == "full_name_and_layers_to_transform":
        assert changed == {"model.layers.1.self_attn.q_proj.weight",
                           "model.layers.0.self_attn.v_proj.weight"}
    if case == "embedding_modules_to_save":
        assert {"model.embed_tokens.weight", "lm_head.weight"} <= changed


@pytest.mark.parametrize("case", ["rslora_patterns", "dora", "gpt2_dora", "lora_bias",
                                  "embedding_saved_base"])
@pytest.mark.parametrize("weight", [0.35, -1.5])
def test_weight_equals_peft_set_scale(cli, tmp_path, bases, adapters, case, weight):
    family = CASES[case][0]
    uses = [(adapters[case], weight)]
    out = fold(cli, tmp_path, bases[family], uses)
    assert_matches_peft(family, bases[family], out, uses)


@pytest.mark.parametrize("order", [("rslora_patterns", "dora", "embedding_modules_to_save"),
                                   ("dora", "rslora_patterns", "embedding_modules_to_save")])
def test_sequential_order_equals_peft(cli, tmp_path, bases, adapters, order):
    """Order matters with DoRA (its norm uses W₀ and rescales earlier deltas); both orders
    match PEFT's merge and unmerged forward, and differ from each other."""
    uses = [(adapters[order[0]], 0.8), (adapters[order[1]], 1.0), (adapters[order[2]], 1.0)]
    out = fold(cli, tmp_path, bases["llama"], uses)
    assert_matches_peft("llama", bases["llama"], out, uses)


def test_saved_base_layers_do_not_conflict(cli, tmp_path, bases, adapters):
    """Two embedding LoRAs, each with PEFT's saved copy of the embedding, fold together at any
    weights (once "both replace `model.embed_tokens.weight`", and weight 1 only: found by a
    black-box check). Oracle: PEFT with both adapters loaded and scaled."""
    import safetensors

    with safetensors.safe_open(adapters["embedding_saved_base"] / "adapter_model.safetensors",
                               "pt") as f:
        assert "base_model.model.model.embed_tokens.base_layer.weight" in set(f.keys())
    uses = [(adapters["embedding_saved_base"], 0.5), (adapters["embedding_saved_base_b"], -0.7)]
    out = fold(cli, tmp_path, bases["llama"], uses)
    assert_matches_peft("llama", bases["llama"], out, uses)


@pytest.mark.parametrize("weight", [0, 0.5, -1])
def test_trained_biases_fold_at_weight_one_only(cli, tmp_path, bases, adapters,
                                                tmp_path_factory, weight):
    """bias="lora_only" saves a targeted module's trained bias as ``….base_layer.bias``: a
    whole-tensor replacement, refused at weight ≠ 1 as bias="all"'s (README, Adapters). It was
    taken for a saved embedding copy and written whole at weight 0 (found by a black-box
    check). One whose bytes are the base's changes nothing and folds at any weight (oracle:
    PEFT's set_scale)."""
    import safetensors.torch

    text = """
        recipekit: 1
        models: {{base: {base}}}
        adapters: {{a: {adapter}}}
        steps:
          - {{name: f, op: adapters, from: base, adapters: [{{use: a, weight: {w}}}]}}
        """
    message = ("adapter 'a' replaces `transformer.h.0.attn.c_attn.bias` whole (modules_to_save "
               f"or a trained bias), which only folds at weight 1, not {float(weight)}")
    for case in ("gpt2_fan_in_fan_out_lora_only", "gpt2_bias_all"):
        out = _run_error(cli, tmp_path, text.format(base=bases["gpt2"], adapter=adapters[case],
                                                    w=weight))
        assert "recipe.yaml:5:" in out and message in out, (case, out)
    untrained = tmp_path_factory.mktemp("untrained_bias") / "ad"
    untrained.mkdir()
    src = adapters["gpt2_fan_in_fan_out_lora_only"]
    (untrained / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = safetensors.torch.load_file(src / "adapter_model.safetensors")
    base = read_tensors(bases["gpt2"])
    biases = [k for k in tensors if k.endswith(".base_layer.bias")]
    assert len(biases) == 4
    for key in biases:
        tensors[key] = base[key.removeprefix("base_model.model.").replace(
            ".base_layer.", ".")].clone()
    safetensors.torch.save_file(tensors, untrained / "adapter_model.safetensors")
    uses = [(untrained, float(weight))]
    (tmp_path / "fold").mkdir()
    out_dir = fold(cli, tmp_path / "fold", bases["gpt2"], uses)
    if weight == 0:
        assert all(torch.equal(t, base[n]) for n, t in read_tensors(out_dir).items())
    else:
        assert_matches_peft("gpt2", bases["gpt2"], out_dir, uses)


def test_sequential_orders_differ(cli, tmp_path, bases, adapters):
    a, b = adapters["rslora_patterns"], adapters["dora"]
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    one = read_tensors(fold(cli, tmp_path / "x", bases["llama"], [(a, 1.0), (b, 1.0)]))
    two = read_tensors(fold(cli, tmp_path / "y", bases["llama"], [(b, 1.0), (a, 1.0)]))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (one[name] - two[name]).abs().max().item() > 1e-3


def test_bf16_base_rounds_once(cli, tmp_path, adapters, bases, tmp_path_factory):
    """A bf16 base: fp32 math rounded once, equal to the fp32 fold rounded to bf16."""
    base16 = make_model("llama", tmp_path_factory.mktemp("b16") / "m", layers=2, seed=3,
                        dtype=torch.bfloat16)
    uses = [(adapters["rslora_patterns"], 1.0)]
    out = read_tensors(fold(cli, tmp_path, base16, uses))
    b = read_tensors(base16)
    ref, _ = peft_merged("llama", base16, uses)  # PEFT merges into the bf16 weights
    name = "model.layers.1.self_attn.q_proj.weight"
    assert out[name].dtype == torch.bfloat16
    # PEFT adds an fp32 delta into bf16 in place: one rounding, as recipekit.
    assert (out[name].float() - ref[name].float()).abs().max().item() <= 1e-2 * 2 ** -7
    assert torch.equal(out["model.norm.weight"], b["model.norm.weight"])


def test_combine_sum_equals_peft_cat(cli, tmp_path, bases, adapters):
    """`combine: sum` = PEFT add_weighted_adapter(combination_type="cat") merged (plain LoRA;
    PEFT's cat copies rsLoRA/DoRA flags from the first adapter, a known bug)."""
    from tests.helpers.adapter_builders import peft_model

    uses = [(adapters["plain"], 0.7), (adapters["all_linear_float_alpha"], -0.4)]
    out = read_tensors(fold(cli, tmp_path, bases["llama"], uses, combine="sum"))
    pm, names = peft_model("llama", bases["llama"], [(p, 1.0) for p, _ in uses])
    pm.add_weighted_adapter(names, [w for _, w in uses], "cat", combination_type="cat")
    pm.base_model.set_adapter("cat")
    ref = pm.merge_and_unload(adapter_names=["cat"]).state_dict()
    for name, tensor in out.items():
        assert (tensor - ref[name]).abs().max().item() <= 1e-6, name


@pytest.mark.parametrize("combine", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_pruning_combines_use_the_merge_kernels(cli, tmp_path, bases, adapters, combine):
    """ties/DARE/magnitude_prune on full deltas: PEFT's per-adapter merged deltas combined by
    the merge kernel (itself checked against mergekit), seeded per tensor name."""
    from recipekit.ops.lora import combine_deltas
    from recipekit.ops.rng import tensor_generator

    uses = [(adapters["plain"], 0.7), (adapters["all_linear_float_alpha"], 0.5)]
    out = read_tensors(fold(cli, tmp_path, bases["llama"], uses, combine=combine,
                            extra="    density: 0.4\n    seed: 7"))
    base = read_tensors(bases["llama"])
    singles = [peft_merged("llama", bases["llama"], [(p, 1.0)])[0] for p, _ in uses]
    for name, tensor in out.items():
        deltas = [s[name] - base[name] for s in singles]
        touched = [i for i, d in enumerate(deltas) if d.abs().max() > 0]
        if not touched:
            assert torch.equal(tensor, base[name])
            continue
        gen = tensor_generator(7, name) if combine.startswith("dare") else None
        expect = base[name] + combine_deltas(combine, [deltas[i] for i in touched],
                                             weights=[uses[i][1] for i in touched],
                                             density=0.4, generator=gen)
        assert (tensor - expect).abs().max().item() <= 1e-6, name


def test_untouched_tensors_are_the_base_loads(tmp_path, bases, adapters):
    """Streaming: only adapter-touched tensors are computed, each from its own base tensor and
    its own adapter factors; everything else is the base's `Load` node (copied as bytes)."""
    from recipekit.graph import Load, LoraFold, expression_nodes
    from recipekit.inputs.resolve import resolve_sources
    from recipekit.plan import compile_plan
    from recipekit.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{base: {bases['llama']}}}
        adapters: {{a: {adapters['all_linear_float_alpha']}}}
        steps:
          - {{name: f, op: adapters, from: base, adapters: [a]}}
        """))
    plan = compile_plan(recipe, resolve_sources(recipe))
    folded = 0
    for t in plan.shards[0].tensors:
        if t.name.endswith("_proj.weight"):
            assert isinstance(t.node, LoraFold)
            loads = {n for n in expression_nodes(t.node) if isinstance(n, Load)}
            assert len(loads) == 3 and {n.source for n in loads} == {"base", "a"}
            folded += 1
        else:
            assert t.node == Load("base", t.name, t.node.shape, t.node.dtype)
    assert folded == 14


def _run_error(cli, tmp_path: Path, text: str) -> str:
    result = cli("run", write_recipe(tmp_path, text), "-q")
    assert result.exit_code == 2, result.output
    return result.output


def test_refusals_are_located(cli, tmp_path, bases, adapters, tmp_path_factory):
    """Every refusal is an exit-2 error at the recipe line that caused it."""
    import json
    import shutil

    plain = adapters["plain"]

    def variant(name: str, drop: str = "", **changes) -> Path:
        d = tmp_path_factory.mktemp(name) / "ad"
        shutil.copytree(plain, d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(changes)
        cfg.pop(drop, None)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        return d

    pickle = variant("pickle")
    (pickle / "adapter_model.safetensors").rename(pickle / "adapter_model.bin")
    cases = {
        "pickle": (pickle, "holds only a pickle adapter (adapter_model.bin)",
                   "recipekit convert --allow-pickle"),
        "loha": (variant("loha", peft_type="LOHA"), "has peft_type 'LOHA', not LORA", None),
        # once "has peft_type 'None', not LORA" (a black-box finding)
        "no peft_type": (variant("nopt", drop="peft_type"), "adapter_config.json has no "
                         "`peft_type` key, so it does not say which PEFT method made it",
                         'a LoRA adapter\'s config holds "peft_type": "LORA"'),
        "null peft_type": (variant("nullpt", peft_type=None), "has peft_type null, not LORA",
                           None),
        "pissa": (variant("pissa", init_lora_weights="pissa_niter_4"),
                  "was initialised with 'pissa_niter_4'", "path_initial_model_for_weight"),
        "olora": (variant("olora", init_lora_weights="olora"), "'olora'", None),
        "replication": (variant("rep", layer_replication=[[0, 2], [1, 2]]),
                        "layer_replication", None),
        "rank": (variant("rank", r=8), "the config gives it rank 8", None),
    }
    for key, (path, message, hint) in cases.items():
        out = _run_error(cli, tmp_path, f"""
            recipekit: 1
            models: {{base: {bases['llama']}}}
            adapters:
              a: {path}
            steps:
              - {{name: f, op: adapters, from: base, adapters: [a]}}
            """)
        assert "recipe.yaml:4:" in out and message in out, (key, out)
        assert hint is None or hint in out, (key, out)


def test_targets_missing_or_of_another_shape(cli, tmp_path, adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("other")
    short = make_model("llama", root / "short", layers=1, seed=3)
    narrow = make_model("llama", root / "narrow", layers=2, seed=3, intermediate_size=48)
    text = """
        recipekit: 1
        models: {{base: {base}}}
        adapters: {{a: {adapter}}}
        steps:
          - name: f
            op: adapters
            from: base
            adapters: [a]
        """
    out = _run_error(cli, tmp_path, text.format(base=short, adapter=adapters["plain"]))
    assert ("recipe.yaml:8:16:" in out and "adapter 'a' updates "
            "`model.layers.1.self_attn.q_proj.weight`, which model 'base' does not have (and "
            "1 more tensor like it)" in out and out.count("steps[0].adapters[0]") == 1), out
    out = _run_error(cli, tmp_path, text.format(base=narrow, adapter=adapters["dora"]))
    assert "`model.layers.0.mlp.gate_proj.weight` as [64, 32], but it is [48, 32]" in out
    # one message per adapter and kind of misfit, not one per tensor (a screen per module)
    assert out.count("steps[0].adapters[0]") == 1, out
    assert "in 'base' (and 1 more tensor like it); the adapter was trained on" in out, out


def test_step_level_refusals(cli, tmp_path, bases, adapters):
    head = "recipekit: 1\nmodels: {{base: {b}}}\nadapters: {{a: {a}, d: {d}}}\nsteps:\n".format(
        b=bases["llama"], a=adapters["embedding_modules_to_save"], d=adapters["dora"])
    out = _run_error(cli, tmp_path, head + "  - {name: f, op: adapters, from: base, "
                     "adapters: [{use: a, weight: 0.5}]}\n")
    assert "recipe.yaml:5:" in out and "replaces `lm_head.weight` whole" in out
    out = _run_error(cli, tmp_path, head + "  - {name: f, op: adapters, from: base, "
                     "adapters: [d], combine: ties, density: 0.5}\n")
    assert "'d' is a DoRA adapter, which only combines `sequential`" in out
    out = _run_error(cli, tmp_path, head + "  - {name: f, op: adapters, from: base, "
                     "adapters: [a], combine: ties}\n")
    assert "combine: ties needs `density:`" in out
    out = _run_error(cli, tmp_path, head + "  - {name: f, op: adapters, from: a, "
                     "adapters: [a]}\n")
    assert "'a' is an adapter set; `from:` names the model to fold into" in out
    out = _run_error(cli, tmp_path, head + "  - {name: f, op: adapters, from: base, "
                     "adapters: [base]}\n")
    assert "'base' is a model, not an adapter set" in out
    out = _run_error(cli, tmp_path, head + "  - {name: f, op: layers, from: a, layers: [0]}\n")
    assert "'a' is an adapter set; op layers takes models here" in out


@pytest.mark.parametrize("case", ["all_linear_float_alpha", "dora", "embedding_modules_to_save",
                                  "gpt2_fan_in_fan_out_lora_only", "gpt2_dora"])
def test_row_pieces_equal_the_whole_fold(cli, tmp_path, bases, adapters, case, monkeypatch):
    """Large folds are computed in row pieces (W and B by rows, A whole; (B·A)ᵀ layouts by
    columns of A; DoRA's row norms within a piece; column norms whole). Oracle: the same fold
    computed whole, at one torch thread, byte for byte (ΔW is made in fixed row blocks either
    way, ops/lora.py), with the pieces computed by three worker threads."""
    import recipekit.plan.cost as pl
    import recipekit.run.execute as ex
    from recipekit.graph import LoraDelta

    family = CASES[case][0]
    uses = [(adapters[case], 1.0)]
    monkeypatch.setattr(LoraDelta, "row_block", 4)  # several blocks per tiny tensor
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (tmp_path / "whole").mkdir()
        (tmp_path / "pieces").mkdir()
        whole = (fold(cli, tmp_path / "whole", bases[family], uses) / "model.safetensors")
        calls = []
        real = ex.evaluate_chunks
        monkeypatch.setattr(ex, "evaluate_chunks", lambda *a: calls.append(a[0]) or real(*a))
        monkeypatch.setattr(pl, "CHUNK_ELEMS", 100)
        monkeypatch.setattr(ex, "piece_workers", lambda: 3)  # pieces on worker threads
        pieces = (fold(cli, tmp_path / "pieces", bases[family], uses) / "model.safetensors")
    finally:
        torch.set_num_threads(threads)
    # GPT-2 DoRA norms run down the (in, out) columns: those folds need the whole tensor
    assert any(type(n).__name__ == "LoraFold" for n in calls) == (case != "gpt2_dora")
    assert whole.read_bytes() == pieces.read_bytes()


@pytest.mark.parametrize("change, where", [
    ({"lora_alpha": float("nan")}, "`lora_alpha`"),
    ({"lora_alpha": float("inf")}, "`lora_alpha`"),
    ({"alpha_pattern": {"q_proj": float("-inf")}}, "`alpha_pattern` entry 'q_proj'"),
    ({"rank_pattern": {"q_proj": float("nan")}}, "`rank_pattern` entry 'q_proj'"),
])
def test_non_finite_scalings_are_refused(cli, tmp_path, bases, adapters, change, where):
    """Issue 17 item 8: Python's JSON reader takes `NaN`/`Infinity` (json.dumps writes them),
    and PEFT would scale every delta to NaN; validate and run refuse it, exit 2, naming the file
    and key."""
    import json
    import shutil

    d = tmp_path / "ad"
    shutil.copytree(adapters["plain"], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(change)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    text = f"""
        recipekit: 1
        models: {{base: {bases['llama']}}}
        adapters:
          a: {d}
        steps:
          - {{name: f, op: adapters, from: base, adapters: [a]}}
        output: {{path: ./out}}
        """
    out = _run_error(cli, tmp_path, text)
    assert "recipe.yaml:4:" in out, out
    assert f"adapter '{d}': {where} in {d / 'adapter_config.json'} is " in out, out
    assert ", not a finite number" in out and "internal error" not in out
    assert not (tmp_path / "out").exists()
    assert cli("validate", tmp_path / "recipe.yaml").exit_code == 2


@pytest.mark.parametrize("lora, what", [
    (dict(target_modules=["q_proj", "lm_head"]), "updates `lm_head.weight`"),
    (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "replaces `lm_head.weight`"),
    # the table saved twice folds (`extract_lora`'s form); two different tables would untie
    (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
     "saves `model.embed_tokens.weight` and `lm_head.weight` whole with different values"),
])
def test_tied_embeddings_are_refused_once(cli, tmp_path, tmp_path_factory, lora, what):
    """An adapter trained on a tied-embedding model that changes its head (an lm_head LoRA,
    modules_to_save) is refused as one that changes its embedding is: folding would untie them.
    It was refused as made for another model ("does not have `lm_head.weight`"), twice for an
    lm_head LoRA with PEFT's saved copy of the head (found by a black-box check)."""
    root = tmp_path_factory.mktemp("tied")
    base = make_model("llama", root / "base", layers=2, seed=3, tie_word_embeddings=True)
    adapter = make_adapter("llama", base, root / "ad", r=4, lora_alpha=8, **lora)
    out = _run_error(cli, tmp_path, f"""
        recipekit: 1
        models: {{base: {base}}}
        adapters: {{a: {adapter}}}
        steps:
          - {{name: f, op: adapters, from: base, adapters: [a]}}
        """)
    message = (f"adapter 'a' {what}, but 'base' ties its input and output embeddings; folding "
               "would have to untie them; version 1 refuses instead")
    assert "recipe.yaml:5:" in out and message in out, out
    assert out.count("steps[0].adapters[0]") == 1 and "does not have" not in out, out


@pytest.mark.parametrize("case, family, flag", [
    ("gpt2_fan_in_fan_out_lora_only", "gpt2", False),  # square c_proj, non-square c_attn
    ("gpt2_dora", "gpt2", False),
    ("plain", "llama", True),  # a square q_proj, a non-square v_proj
])
def test_fan_in_fan_out_follows_the_module_type(cli, tmp_path, bases, adapters, case, family,
                                                flag):
    """PEFT lays out a module by its type (`Conv1D` transposed, `nn.Linear` not) whatever the
    config's `fan_in_fan_out` says, and warns; recipekit trusted the flag: a GPT-2 adapter with
    the flag edited to false folded its square `c_proj` silently wrong and refused `c_attn` as
    "trained on a model of other dimensions", a Llama one with true transposed `q_proj` (found
    by a black-box check). Oracle: PEFT's merge, the same with either flag."""
    import json
    import shutil

    d = tmp_path / "edited"
    shutil.copytree(adapters[case], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is not flag
    cfg["fan_in_fan_out"] = flag
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{base: {bases[family]}}}
        adapters: {{a: {d}}}
        steps:
          - {{name: f, op: adapters, from: base, adapters: [a]}}
        output: {{path: ./out}}
        """)
    result = cli("run", recipe)
    assert result.exit_code == 0, result.output
    layout = ("a GPT-2 `Conv1D` weight, stored (in, out)" if family == "gpt2"
              else "a linear weight, stored (out, in)")
    assert (f"warning: adapter 'a': its config sets fan_in_fan_out to "
            f"{str(flag).lower()}, but " in result.stderr and f"is {layout} in 'base' (and "
            in result.stderr and f"with fan_in_fan_out {str(not flag).lower()}"
            in result.stderr), result.stderr
    assert result.stderr.count("sets fan_in_fan_out") == 1, result.stderr  # once per adapter
    ref_flag, _ = peft_merged(family, bases[family], [(d, 1.0)])
    ref_saved, _ = peft_merged(family, bases[family], [(adapters[case], 1.0)])
    assert all(torch.equal(ref_flag[k], ref_saved[k]) for k in ref_saved)
    assert_matches_peft(family, bases[family], tmp_path / "out", [(d, 1.0)])

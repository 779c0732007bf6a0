"""`extract_lora`: a LoRA adapter from tuned − base.

Oracles: the difference itself (full rank reproduces it within 1e-5), Eckart–Young (at rank k
the Frobenius error equals √Σ of the discarded singular values², which torch's SVD of the
difference gives), and PEFT (the written directory loads and merges to tuned).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers.builders import load_model, make_model, read_tensors
from tests.helpers.recipes import write_recipe


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    family = request.param
    return (family, make_model(family, root / "base", layers=2, seed=3),
            make_model(family, root / "tuned", layers=2, seed=4))


def extract(cli, tmp_path, base, tuned, rank: int, extra: str = ""):
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{base: {base}, tuned: {tuned}}}
        steps:
          - {{name: lora, op: extract_lora, base: base, tuned: tuned, rank: {rank}{extra}}}
        output: {{path: ./out}}
        """)
    result = cli("run", recipe, "-q")
    assert result.exit_code == 0, result.output
    return tmp_path / "out"


def test_full_rank_reproduces_the_difference_in_peft(cli, tmp_path, pair):
    import peft

    family, base, tuned = pair
    out = extract(cli, tmp_path, base, tuned, rank=1000)
    merged = peft.PeftModel.from_pretrained(load_model(family, base), out).merge_and_unload()
    want, w0 = read_tensors(tuned), read_tensors(base)
    for name, t in merged.state_dict().items():
        if name not in want:
            continue  # tied lm_head
        if t.dim() == 2 and name.endswith(".weight"):
            assert (t - want[name]).abs().max().item() <= 1e-5, name
        else:  # 1-D tensors (norms, biases) are not extracted
            assert torch.equal(t, w0[name]), name


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_lower_rank_error_is_the_discarded_singular_values(cli, tmp_path, pair, method):
    """exact: Eckart–Young's error to 1e-5; randomized (the default): at most 0.05% above it
    (tests/ops/test_lowrank.py holds it to that on real-shaped matrices; these small ones are
    spanned by the Krylov blocks, so the result is exact up to rounding)."""
    family, base, tuned = pair
    out = extract(cli, tmp_path, base, tuned, rank=3, extra=f", method: {method}")
    factors, w0, w1 = read_tensors(out), read_tensors(base), read_tensors(tuned)
    checked = 0
    for key, a in factors.items():
        if not key.endswith(("lora_A.weight", "lora_embedding_A")):
            continue
        module = key[len("base_model.model."):].rsplit(".lora_", 1)[0]
        b = factors[key.replace("lora_A", "lora_B").replace("_embedding_A", "_embedding_B")]
        name = module + ".weight"
        diff = (w1[name] - w0[name]).double()
        approx = (b.double() @ a.double())
        if "embedding" in key or family == "gpt2":  # embeddings and Conv1D store (in, out)
            approx = approx.T
        s = torch.linalg.svdvals(diff)
        want = math.sqrt(float((s[3:] ** 2).sum()))
        got = torch.linalg.norm(diff - approx).item()
        if method == "exact":
            assert abs(got - want) <= 1e-5 * max(1, want)
        else:
            assert want - 1e-5 <= got <= 1.0005 * want + 1e-5, (key, got / want)
        checked += 1
    assert checked >= 8


def test_sv_epsilon_zeroes_small_components(cli, tmp_path, pair):
    family, base, tuned = pair
    out = extract(cli, tmp_path, base, tuned, rank=8, extra=", sv_epsilon: 1e9")
    # (GPT-2's tied embedding table is saved whole, not as LoRA factors)
    factors = {k: t for k, t in read_tensors(out).items() if ".lora_" in k}
    assert factors and all(t.abs().max() == 0 for t in factors.values())


def test_exact_method_refuses_randomized_parameters(cli, tmp_path, pair):
    _, base, tuned = pair
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{base: {base}, tuned: {tuned}}}
        steps:
          - {{name: lora, op: extract_lora, base: base, tuned: tuned, rank: 2, method: exact,
              oversample: 4, tolerance: 0}}
        """)
    result = cli("validate", recipe)
    assert result.exit_code == 2
    assert ("recipe.yaml:5:7: steps[0].oversample: `oversample` is a parameter of method "
            "randomized; method exact runs a full SVD") in result.output
    assert "steps[0].tolerance: `tolerance` is a parameter of method randomized" in result.output


def test_a_resized_vocabulary_is_refused_with_a_fix_the_step_takes(cli, tmp_path):
    """extract_lora takes no `tokenizer:`: the message once suggested adding one, at a
    `steps[0].from` the step does not have (found by a black-box check)."""
    base = make_model("llama", tmp_path / "base", layers=2, seed=3)
    tuned = make_model("llama", tmp_path / "tuned", layers=2, seed=4, vocab_size=260)
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{base: {base}, tuned: {tuned}}}
        steps:
          - name: lora
            op: extract_lora
            base: base
            tuned: tuned
            rank: 2
        """)
    result = cli("validate", recipe)
    assert result.exit_code == 2
    assert "recipe.yaml:7:12: steps[0].tuned: `" in result.stderr
    assert ("(the vocabulary sizes differ); a LoRA adapter cannot change the vocabulary size"
            in result.stderr)
    assert "tokenizer" not in result.stderr


def test_tolerance_is_validated(cli, tmp_path, pair):
    """A negative `tolerance` is a located exit 2; 0 (every pass, tests/ops/test_lowrank.py)
    runs."""
    _, base, tuned = pair
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{base: {base}, tuned: {tuned}}}
        steps:
          - {{name: lora, op: extract_lora, base: base, tuned: tuned, rank: 2, tolerance: -1}}
        """)
    result = cli("validate", recipe)
    assert result.exit_code == 2 and "steps[0].tolerance" in result.output
    assert read_tensors(extract(cli, tmp_path, base, tuned, rank=2, extra=", tolerance: 0"))


def partly_tuned(base: Path, out: Path, changed: tuple[str, ...]) -> Path:
    """A copy of ``base`` (other files) in which only the ``changed`` tensors differ."""
    shutil.copytree(base, out)
    tensors = read_tensors(base)
    g = torch.Generator().manual_seed(5)
    for name in changed:
        tensors[name] = tensors[name] + 0.01 * torch.randn(tensors[name].shape, generator=g)
    for f in out.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


CHANGED = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")


def test_unchanged_weights_get_no_module(cli, tmp_path, tiny_llama):
    """Equal bytes in two files are two plan nodes; the step compares the stored bytes and
    writes modules only for the weights that changed (the oracle: which tensors we changed)."""
    tuned = partly_tuned(tiny_llama, tmp_path / "tuned", CHANGED)
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{base: {tiny_llama}, tuned: {tuned}}}
        steps:
          - {{name: lora, op: extract_lora, base: base, tuned: tuned, rank: 4}}
        output: {{path: ./out}}
        """)
    plan = cli("plan", recipe)
    assert plan.exit_code == 0, plan.output
    assert "tensors:       4 written" in plan.output
    assert "'lora': 56 weight(s) are equal in 'tuned' and 'base'" in plan.output
    result = cli("run", recipe, "-q")
    assert result.exit_code == 0, result.output
    written = read_tensors(tmp_path / "out")
    modules = {k[len("base_model.model."):].rsplit(".lora_", 1)[0] + ".weight" for k in written}
    assert modules == set(CHANGED)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(n[:-len(".weight")] for n in CHANGED)


def test_peft_auto_class_loads_the_adapter_alone(cli, tmp_path, tiny_llama):
    """adapter_config.json names the base (its absolute path) and task_type CAUSAL_LM, so
    `AutoPeftModelForCausalLM` needs nothing else; merged, it reproduces the tuned weights."""
    from peft import AutoPeftModelForCausalLM

    tuned = partly_tuned(tiny_llama, tmp_path / "tuned", CHANGED)
    out = extract(cli, tmp_path, tiny_llama, tuned, rank=1000)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(tiny_llama.absolute())
    merged = AutoPeftModelForCausalLM.from_pretrained(out).merge_and_unload().state_dict()
    want = read_tensors(tuned)
    for name in CHANGED:
        assert (merged[name] - want[name]).abs().max().item() <= 1e-5, name
    result = cli("verify", out, "--load")
    assert result.exit_code == 0, result.output
    assert "loaded PEFT adapter on" in result.output


def test_a_computed_base_is_named_by_nobody(cli, tmp_path, tiny_llama):
    """A base that is a step exists on no disk: no base_model_name_or_path, and `verify
    --load` asks for `--base`."""
    tuned = partly_tuned(tiny_llama, tmp_path / "tuned", CHANGED)
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{base: {tiny_llama}, tuned: {tuned}}}
        steps:
          - {{name: cut, op: layers, from: base, layers: ["range(0,8)"]}}
          - {{name: lora, op: extract_lora, base: cut, tuned: tuned, rank: 2}}
        output: {{path: ./out}}
        """)
    assert cli("run", recipe, "-q").exit_code == 0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["task_type"]) == (None, "CAUSAL_LM")
    result = cli("verify", tmp_path / "out", "--load")
    assert result.exit_code == 2
    assert "`--load` needs the model it adapts; pass `--base MODEL_DIR`" in result.output


def test_hub_base_is_named_by_its_repo_id(cli, tmp_path, hub_cache, tiny_llama):
    """A base from the hub: its repo id, as PEFT records it; PEFT loads it from the cache."""
    from peft import AutoPeftModelForCausalLM

    tuned = partly_tuned(tiny_llama, tmp_path / "tuned", CHANGED)
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{base: {{hub: org/tiny}}, tuned: {tuned}}}
        steps:
          - {{name: lora, op: extract_lora, base: base, tuned: tuned, rank: 2}}
        output: {{path: ./out}}
        """)
    result = cli("run", recipe, "-q")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/tiny", None)
    # huggingface_hub read HF_HUB_CACHE at import: name the fake cache to transformers
    AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out", cache_dir=hub_cache)
    result = cli("verify", tmp_path / "out", "--load")
    assert result.exit_code == 0, result.output


def test_each_module_runs_its_range_finder_once(cli, tmp_path, pair, monkeypatch):
    """A module's A and B are two output tensors; the executor keeps the reduction's value
    for the second (`run.execute.Runtime.shared`), so the range finder runs once per module.
    Oracle: a count of `RangeFinderFactors.reduce` calls against the adapter's modules."""
    from safetensors import safe_open

    from recipekit.graph.lora import RangeFinderFactors

    calls: list[str] = []
    real = RangeFinderFactors.reduce
    monkeypatch.setattr(RangeFinderFactors, "reduce",
                        lambda self, *a: calls.append(self.tensor) or real(self, *a))
    out = extract(cli, tmp_path, pair[1], pair[2], rank=4)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())  # noqa: SIM118 (a safe_open handle is not iterable)
    modules = {k.rsplit(".lora_", 1)[0] for k in names if ".lora_" in k}
    assert len(calls) == len(modules) and len(set(calls)) == len(calls)


def changed_copy(base: Path, out: Path, changed: dict[str, torch.Tensor]) -> Path:
    """A copy of ``base`` (other files) with ``changed`` tensors added to its own."""
    shutil.copytree(base, out)
    tensors = read_tensors(base)
    for name, delta in changed.items():
        tensors[name] = tensors[name] + delta
    for f in out.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def one_step(tmp_path, base, tuned, extra: str = "", rank: int = 4) -> Path:
    return write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{base: {base}, tuned: {tuned}}}
        steps: [{{name: l, op: extract_lora, base: base, tuned: tuned, rank: {rank}{extra}}}]
        output: {{path: ./out}}
        """)


@pytest.mark.parametrize("changed", ["nothing", "norms"])
def test_no_differing_2d_weight_is_a_located_error(cli, tmp_path, tiny_llama, changed):
    """A byte copy of the base, or a BitFit-style tune of norms alone, leaves no module: the
    empty adapter once planned a shard without tensors and crashed (`internal error:
    ValueError: zip() argument 2 is longer than argument 1`, exit 1; found by a black-box
    check). Oracle: the exit code and the whole message, from validate, plan, run and the
    API alike."""
    import recipekit
    from recipekit.errors import RecipeErrors

    deltas = {} if changed == "nothing" else {
        f"model.layers.{i}.input_layernorm.weight": torch.full((32,), 0.01) for i in range(8)}
    tuned = changed_copy(tiny_llama, tmp_path / "tuned", deltas)
    recipe = one_step(tmp_path, tiny_llama, tuned)
    why = ("every tensor is equal byte for byte" if changed == "nothing" else
           "only 1-D tensors changed (8, e.g. `model.layers.0.input_layernorm.weight`), which "
           "LoRA cannot carry")
    want = (f"recipe.yaml:3:56: steps[0].tuned: no 2-D weight differs between 'tuned' and "
            f"'base': {why}, so there is no LoRA to extract; check that `tuned` names the "
            "fine-tune; a fine-tune of only biases and norms (BitFit) is not a LoRA: merge or "
            "copy it instead")
    for command in ("validate", "plan", "run"):
        result = cli(command, recipe, *(["-q"] if command == "run" else []))
        assert result.exit_code == 2, (command, result.output)
        assert want in result.stderr, (command, result.stderr)
        assert "internal error" not in result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(RecipeErrors, match="no 2-D weight differs"):
        recipekit.plan(recipe)


def peft_logits(out: Path, ids: torch.Tensor, cls_name: str) -> tuple[torch.Tensor, ...]:
    """(unmerged, merged) outputs of the adapter in PEFT, which loads the base it names."""
    import peft

    model = getattr(peft, cls_name).from_pretrained(out).eval()
    with torch.no_grad():
        unmerged = model(ids).logits
        return unmerged, model.merge_and_unload()(ids).logits


def rank_k(base: Path, tuned: Path, out: Path, k: int) -> Path:
    """The base plus the best rank-k approximation of each differing 2-D difference (the
    optimum an extraction of rank k can reach), saved as a model."""
    w0, w1 = read_tensors(base), read_tensors(tuned)
    deltas = {}
    for name, t in w1.items():
        d = (t - w0[name]).double()
        if d.dim() == 2 and d.abs().max() > 0:
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
            deltas[name] = ((u[:, :k] * s[:k]) @ vh[:k]).float()
    return changed_copy(base, out, deltas)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


@pytest.mark.parametrize("family", ["qwen2", "gemma", "gpt2"])
@pytest.mark.parametrize("what", ["embedding", "embedding and a layer"])
def test_tied_embeddings_are_saved_whole_for_peft(cli, tmp_path, family, what):
    """PEFT applies an embedding LoRA to the input lookup only, not to the head tied to it:
    unmerged, the tuned head was lost (relative logit error 0.99 against 1e-7 at the rank-4
    optimum; merged was right: found by a black-box check). The tuned table is now saved whole
    as both modules (modules_to_save, as mergekit-extract-lora does), with PEFT's placeholder
    target when no LoRA module remains. Oracle: PEFT's outputs unmerged and merged against the
    tuned model's, no worse than the rank-4 optimum, and equal to each other."""
    from tests.helpers.builders import load_model

    base = make_model(family, tmp_path / "base", layers=2, seed=3)
    table = "transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
    layer = ("transformer.h.0.attn.c_attn.weight" if family == "gpt2"
             else "model.layers.0.self_attn.q_proj.weight")
    w0 = read_tensors(base)
    g = torch.Generator().manual_seed(6)
    deltas = {n: 0.5 * torch.randn(w0[n].shape, generator=g)
              for n in ([table] if what == "embedding" else [table, layer])}
    tuned = changed_copy(base, tmp_path / "tuned", deltas)
    result = cli("run", one_step(tmp_path, base, tuned, ", method: exact"), "-q")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    head = "lm_head"
    assert config["modules_to_save"] == sorted([table.rsplit(".", 1)[0], head])
    written = read_tensors(out)
    assert torch.equal(written[f"base_model.model.{table}"], read_tensors(tuned)[table])
    assert torch.equal(written[f"base_model.model.{head}.weight"], read_tensors(tuned)[table])
    assert config["target_modules"] == (
        "dummy-target-modules" if what == "embedding" else [layer.rsplit(".", 1)[0]])

    ids = torch.randint(0, 128, (2, 12), generator=g)
    with torch.no_grad():
        ref = load_model(family, tuned).eval()(ids).logits
        best = load_model(family, rank_k(base, tuned, tmp_path / "opt", 4)).eval()(ids).logits
    unmerged, merged = peft_logits(out, ids, "AutoPeftModelForCausalLM")
    assert rel(unmerged, ref) <= rel(best, ref) + 1e-5
    assert rel(merged, ref) <= rel(best, ref) + 1e-5
    assert rel(merged, unmerged) <= 1e-5
    result = cli("verify", out, "--load")
    assert result.exit_code == 0, result.output
    # recipekit folds it back as PEFT merges it: the table, and so the head tied to it, is the
    # tuned one (it was refused: "folding would have to untie them")
    fold = write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{base: {base}}}
        adapters: {{x: {out}}}
        steps: [{{name: f, op: adapters, from: base, adapters: [x]}}]
        output: {{path: ./folded}}
        """, name="fold.yaml")
    result = cli("run", fold, "-q")
    assert result.exit_code == 0, result.output
    folded = read_tensors(tmp_path / "folded")
    assert torch.equal(folded[table], read_tensors(tuned)[table])
    assert f"{head}.weight" not in folded
    with torch.no_grad():
        assert rel(load_model(family, tmp_path / "folded").eval()(ids).logits, merged) <= 1e-5


@pytest.mark.parametrize("score_changed", [True, False])
def test_a_classifier_head_is_saved_whole_for_peft(cli, tmp_path, score_changed):
    """PEFT's `PeftModelForSequenceClassification` adds `classifier` and `score` to
    modules_to_save by itself and loads their whole weights from the adapter: a `score` LoRA
    (or nothing, when the head was not tuned) failed with `KeyError:
    'base_model.model.score.weight'` (found by a black-box check). The tuned head is now
    saved whole. Oracle: PEFT's AutoPeftModelForSequenceClassification, unmerged and merged,
    against the tuned classifier at full rank (to 1e-5)."""
    import transformers as tf

    from tests.helpers.builders import DECODER

    torch.manual_seed(7)
    config = tf.MistralConfig(**DECODER, num_hidden_layers=2, num_labels=3, pad_token_id=0)
    tf.MistralForSequenceClassification(config).save_pretrained(tmp_path / "base")
    base = tmp_path / "base"
    w0 = read_tensors(base)
    g = torch.Generator().manual_seed(8)
    names = ["model.layers.1.mlp.up_proj.weight"] + (["score.weight"] if score_changed else [])
    tuned = changed_copy(base, tmp_path / "tuned", {
        n: 0.1 * torch.randn(w0[n].shape, generator=g) for n in names})
    result = cli("run", one_step(tmp_path, base, tuned, rank=64), "-q")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    config_out = json.loads((out / "adapter_config.json").read_text())
    assert config_out["task_type"] == "SEQ_CLS"
    assert config_out["modules_to_save"] == ["score"]
    assert config_out["target_modules"] == ["model.layers.1.mlp.up_proj"]
    assert torch.equal(read_tensors(out)["base_model.model.score.weight"],
                       read_tensors(tuned)["score.weight"])
    ids = torch.randint(1, 128, (2, 8), generator=g)
    with torch.no_grad():
        ref = tf.MistralForSequenceClassification.from_pretrained(tuned).eval()(ids).logits
    unmerged, merged = peft_logits(out, ids, "AutoPeftModelForSequenceClassification")
    assert rel(unmerged, ref) <= 1e-5 and rel(merged, ref) <= 1e-5
    result = cli("verify", out, "--load")
    assert result.exit_code == 0, result.output

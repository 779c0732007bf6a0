"""The `reinit` op, and the classifier recipe that composes `layers` + `reinit` + `head`.

Oracles: each re-initialized weight is ``torch.normal(0, std)`` from the (seed, tensor name)
generator in fp32, rounded once to its dtype; norms are exactly ones (zeros for Gemma's
``(1 + w)`` RMSNorm, which transformers' Gemma2RMSNorm then applies as an identity scale);
biases exactly zeros; every other tensor is bit-identical to the source; the outputs load and
run in transformers (``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml

from recipekit.ops.rng import tensor_generator

from tests.helpers.builders import make_model, read_tensors


def write(directory: Path, models: dict[str, Path], steps: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    recipe = {"recipekit": 1, "models": {k: str(v) for k, v in models.items()}, "steps": steps,
              "output": {"path": "out"}}
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_ok(cli, recipe: Path) -> dict[str, torch.Tensor]:
    result = cli("run", recipe, "-q", "--no-fsync")
    assert result.exit_code == 0, result.output
    return read_tensors(recipe.parent / "out")


def reinit(directory: Path, model: Path, layers: list, seed: int | None = None) -> Path:
    step = {"name": "fresh", "op": "reinit", "from": "src", "layers": layers}
    if seed is not None:
        step["seed"] = seed
    return write(directory, {"src": model}, [step])


def normal_like(t: torch.Tensor, std: float, seed: int, name: str) -> torch.Tensor:
    draw = torch.empty(t.shape).normal_(0.0, std, generator=tensor_generator(seed, name))
    return draw.to(t.dtype)


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory) -> Path:
    return make_model("llama", tmp_path_factory.mktemp("l") / "m", layers=6, seed=5,
                      dtype=torch.bfloat16)


class TestReinit:
    """Oracle: per-tensor torch.normal draws and constant fills; untouched tensors bit-exact."""

    def test_selected_layers_are_fresh_and_the_rest_bit_identical(self, cli, tmp_path,
                                                                  bf16_llama):
        out = run_ok(cli, reinit(tmp_path, bf16_llama, [1, "range(3,5)"], seed=7))
        src = read_tensors(bf16_llama)
        assert out.keys() == src.keys()
        fresh = 0
        for name, t in out.items():
            assert t.dtype == src[name].dtype and t.shape == src[name].shape
            layer = name.split(".")[2] if name.startswith("model.layers.") else None
            if layer not in ("1", "3", "4"):
                assert torch.equal(t, src[name]), name
            elif name.endswith("norm.weight"):
                assert torch.equal(t, torch.ones_like(t)), name
            else:
                assert torch.equal(t, normal_like(t, 0.02, 7, name)), name
                fresh += 1
        assert fresh == 3 * 7

    def test_seed_reproduces_and_another_differs(self, cli, tmp_path, bf16_llama):
        a = run_ok(cli, reinit(tmp_path / "a", bf16_llama, [2], seed=1))
        b = run_ok(cli, reinit(tmp_path / "b", bf16_llama, [2], seed=1))
        c = run_ok(cli, reinit(tmp_path / "c", bf16_llama, [2], seed=2))
        assert (tmp_path / "a/out/model.safetensors").read_bytes() == (
            tmp_path / "b/out/model.safetensors").read_bytes()
        name = "model.layers.2.mlp.up_proj.weight"
        assert not torch.equal(a[name], c[name])
        assert torch.equal(a["model.layers.3.mlp.up_proj.weight"],
                           c["model.layers.3.mlp.up_proj.weight"])
        assert all(torch.equal(a[n], b[n]) for n in a)

    def test_a_tensor_does_not_depend_on_what_else_is_reinitialized(self, cli, tmp_path,
                                                                     bf16_llama):
        alone = run_ok(cli, reinit(tmp_path / "a", bf16_llama, [4]))
        more = run_ok(cli, reinit(tmp_path / "b", bf16_llama, ["range(0,6)"]))
        for name in alone:
            if name.startswith("model.layers.4."):
                assert torch.equal(alone[name], more[name]), name

    def test_qwen2_biases_are_zeros(self, cli, tmp_path):
        src = make_model("qwen2", tmp_path / "q", layers=2)
        out = run_ok(cli, reinit(tmp_path, src, [0]))
        bias = out["model.layers.0.self_attn.q_proj.bias"]
        assert bias.numel() and torch.equal(bias, torch.zeros_like(bias))
        assert not torch.equal(read_tensors(src)["model.layers.0.self_attn.q_proj.bias"], bias)

    def test_gpt2_residual_projections_use_the_scaled_std(self, cli, tmp_path):
        src = make_model("gpt2", tmp_path / "g", layers=8, initializer_range=0.4)
        out = run_ok(cli, reinit(tmp_path, src, [5], seed=3))
        name = "transformer.h.5.attn.c_proj.weight"
        assert torch.equal(out[name], normal_like(out[name], 0.4 / 4.0, 3, name))  # √(2·8) = 4
        name = "transformer.h.5.mlp.c_fc.weight"
        assert torch.equal(out[name], normal_like(out[name], 0.4, 3, name))
        tf.GPT2LMHeadModel.from_pretrained(tmp_path / "out")

    def test_gemma2_norms_act_as_identity_scale(self, cli, tmp_path):
        src = make_model("gemma2", tmp_path / "g", layers=3)
        out = run_ok(cli, reinit(tmp_path, src, [1]))
        norms = [n for n in out if n.startswith("model.layers.1.") and "norm" in n]
        assert len(norms) == 4
        assert all(torch.equal(out[n], torch.zeros_like(out[n])) for n in norms)
        model, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                              output_loading_info=True)
        assert not any(info.values()), info
        x = torch.randn(2, 5, 32)
        eps = model.config.rms_norm_eps
        plain = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        layer = model.model.layers[1]
        for module in (layer.input_layernorm, layer.post_attention_layernorm,
                       layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm):
            torch.testing.assert_close(module(x), plain)
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]))

    def test_out_of_range_layer_is_a_located_error(self, cli, tmp_path, bf16_llama):
        result = cli("validate", reinit(tmp_path, bf16_llama, [2, "range(4,9)"]))
        assert result.exit_code == 2
        assert ("recipe.yaml:10:5: steps[0].layers[1]: range(4,9) reaches layer 8, but model "
                "'src' has 6 layers (0-5); use indices below 6") in result.stderr

    def test_unknown_family_is_a_located_error(self, cli, tmp_path, bf16_llama):
        import json
        import shutil

        odd = tmp_path / "odd"
        shutil.copytree(bf16_llama, odd)
        config = json.loads((odd / "config.json").read_text())
        config.update(model_type="mystery", architectures=["MysteryForCausalLM"])
        (odd / "config.json").write_text(json.dumps(config))
        result = cli("validate", reinit(tmp_path, odd, [0]))
        assert result.exit_code == 2
        assert ("steps[0].from: the reinit op needs a known architecture, but 'src' is not one "
                "(model_type 'mystery', layers `model.layers.<i>`)") in result.stderr
        assert "known families: bert, deit, gemma," in result.stderr
        # the head op lists only the families it can put a classifier on (it listed bert)
        (tmp_path / "h.yaml").write_text(
            f"recipekit: 1\nmodels: {{src: {odd}}}\nsteps:\n  - {{name: clf, op: head, "
            "from: src, num_labels: 2}\noutput: {path: out}\n")
        result = cli("validate", tmp_path / "h.yaml")
        assert result.exit_code == 2
        assert "known families: gemma, gemma2, gpt2, llama, mistral, phi3, qwen2" in \
            result.stderr


class TestClassifierRecipe:
    """`layers` (drop layers) + `reinit` + `head` in one recipe: loads, runs, reproduces; and
    with a LoRA folded in by `adapters` (the issue's whole composition)."""

    STEPS = [
        {"name": "trimmed", "op": "layers", "from": "src", "layers": ["range(0,3)",
                                                                       "range(4,6)"]},
        {"name": "fresh", "op": "reinit", "from": "trimmed", "layers": [4]},
        {"name": "clf", "op": "head", "from": "fresh", "labels": ["a", "b", "c"]},
    ]

    def recipe(self, directory: Path, model: Path, seed: int) -> Path:
        steps = [dict(s) for s in self.STEPS]
        steps[1]["seed"] = seed
        steps[2]["seed"] = seed
        return write(directory, {"src": model}, steps)

    def test_composed(self, cli, tmp_path, bf16_llama):
        src = read_tensors(bf16_llama)
        out = run_ok(cli, self.recipe(tmp_path / "a", bf16_llama, seed=1))
        run_ok(cli, self.recipe(tmp_path / "b", bf16_llama, seed=1))
        other = run_ok(cli, self.recipe(tmp_path / "c", bf16_llama, seed=2))
        assert (tmp_path / "a/out/model.safetensors").read_bytes() == (
            tmp_path / "b/out/model.safetensors").read_bytes()
        moved = {0: 0, 1: 1, 2: 2, 3: 4}  # output layer -> source layer (layer 3 dropped)
        for name, t in out.items():
            if name.endswith("norm.weight") and name.startswith("model.layers.4."):
                assert torch.equal(t, torch.ones_like(t)), name
            elif name.startswith("model.layers.4.") or name == "score.weight":
                assert torch.equal(t, normal_like(t, 0.02, 1, name)), name
                assert not torch.equal(t, other[name]), name  # another seed, other values
            elif name.startswith("model.layers."):
                i = int(name.split(".")[2])
                source_name = name.replace(f"layers.{i}.", f"layers.{moved[i]}.", 1)
                assert torch.equal(t, src[source_name]), name
            else:
                assert torch.equal(t, src[name]), name
                assert torch.equal(t, other[name]), name
        assert "lm_head.weight" not in out

        model, info = tf.AutoModelForSequenceClassification.from_pretrained(
            tmp_path / "a/out", output_loading_info=True)
        assert not any(info.values()), info
        assert type(model).__name__ == "LlamaForSequenceClassification"
        assert model.config.num_hidden_layers == 5
        ids = torch.tensor([[5, 6, 7, 2, 2], [8, 9, 10, 11, 12]])  # pad = eos = 2
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=(ids != 2).long()).logits
        assert logits.shape == (2, 3) and torch.isfinite(logits).all()

    def test_composed_with_adapters(self, cli, tmp_path):
        """layers + reinit + adapters + head. Oracle: PEFT's merge_and_unload of the same
        adapter into the `layers` + `reinit` output, then the head; the result loads as a
        sequence classifier and runs."""
        from tests.helpers.adapter_builders import make_adapter, peft_merged

        src = make_model("llama", tmp_path / "src", layers=6, seed=7)
        body = [dict(s) for s in self.STEPS[:2]]
        body[1]["seed"] = 3
        fresh = tmp_path / "fresh" / "out"
        run_ok(cli, write(tmp_path / "fresh", {"src": src}, body))
        lora = make_adapter("llama", fresh, tmp_path / "lora", seed=4, r=4, lora_alpha=8,
                            target_modules=["q_proj", "v_proj", "down_proj"])
        reference, _ = peft_merged("llama", fresh, [(lora, 1.0)])

        steps = body + [{"name": "tuned", "op": "adapters", "from": "fresh",
                         "adapters": ["lora"]},
                        {"name": "clf", "op": "head", "from": "tuned", "labels": ["a", "b"],
                         "seed": 3}]
        recipe = write(tmp_path / "all", {"src": src}, steps)
        text = yaml.safe_load(recipe.read_text())
        text["adapters"] = {"lora": str(lora)}
        recipe.write_text(yaml.safe_dump(text, sort_keys=False))
        out = run_ok(cli, recipe)

        assert set(out) == (set(reference) - {"lm_head.weight"}) | {"score.weight"}
        changed = 0
        for name, t in out.items():
            if name == "score.weight":
                assert torch.equal(t, normal_like(t, 0.02, 3, name))
                continue
            assert (t - reference[name]).abs().max().item() <= 1e-6, name
            changed += not torch.equal(t, read_tensors(fresh)[name])
        assert changed == 5 * 3  # q, v and down of every layer
        model = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "all/out")
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
        assert logits.shape == (1, 2) and torch.isfinite(logits).all()

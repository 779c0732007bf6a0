"""The `moe` op: sparse MoE checkpoints from dense experts.

Oracles: mergekit-moe 0.1.5's output on the same tiny models (every non-router tensor and every
expert slice bit-exact, random routers bit-exact with ``--random-seed 42``, config.json key by
key); transformers 5 (the output loads; an MoE whose experts all equal the base gives the
base's logits, since the top-k weights sum to one; one layer of distinct experts equals the
routed mixture computed by hand from the dense experts' tensors); PEFT (an adapter expert's
tensors equal the PEFT-merged dense expert's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml

from recipekit.graph import Node

from tests.helpers.adapter_builders import make_adapter, peft_merged
from tests.helpers.builders import make_model, read_tensors
from tests.helpers.mergekit import needs_mergekit
from tests.helpers.moe import (
    make_expert,
    make_qwen3,
    mixtral_as_mlp,
    run_mergekit_moe,
    unfuse_mergekit,
)

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 70, 71, 72, 5, 6, 7, 8]])
PROMPTS = [{"positive_prompts": ["def f(x): return x"]},
           {"positive_prompts": ["once upon a time"], "negative_prompts": ["import os"]},
           {"positive_prompts": ["2 + 2 = 4"]}]


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, Path]:
    """A Llama base and three Llama experts (3 layers, hidden 32, intermediate 64)."""
    root = tmp_path_factory.mktemp("moe")
    return {n: make_expert("llama", root / n, seed=i) for i, n in enumerate(["base", "a", "b",
                                                                               "c"])}


def moe_recipe(directory: Path, models: dict[str, Path], step: dict, *, adapters=None,
               output: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    doc = {"recipekit": 1, "models": {k: str(v) for k, v in models.items()}}
    if adapters:
        doc["adapters"] = {k: str(v) for k, v in adapters.items()}
    doc["steps"] = [{"name": "moe", "op": "moe", **step}]
    doc["output"] = {"path": "out", **(output or {})}
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_ok(cli, recipe: Path) -> dict[str, torch.Tensor]:
    result = cli("run", recipe, "-q", "--no-fsync")
    assert result.exit_code == 0, result.output
    return read_tensors(recipe.parent / "out")


def mergekit_config(directory: Path, models: dict[str, Path], base: str, experts: list[dict],
                    **keys: object) -> Path:
    doc = {"base_model": str(models[base]), **keys, "experts": [
        {"source_model": str(models[e.pop("model")]), **e} for e in experts]}
    path = directory / "mergekit-moe.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@needs_mergekit
class TestMergekitParity:
    """Oracle: mergekit-moe 0.1.5 run with --random-seed 42 on the same models."""

    @pytest.mark.parametrize("mode,k,experts", [("random", 2, 2), ("uniform_random", 1, 3)])
    def test_mixtral_tensors_and_config(self, cli, tmp_path, dense, mode, k, experts):
        names = ["a", "b", "c"][:experts]
        entries = [{"model": n, **PROMPTS[i], **({"residual_scale": 0.5} if i == 1 else {})}
                   for i, n in enumerate(names)]
        ours = run_ok(cli, moe_recipe(tmp_path / "rk", dense, {
            "base": "base", "experts": [dict(e) for e in entries], "gate_mode": mode,
            "experts_per_token": k, "seed": 42}))
        theirs = run_mergekit_moe(mergekit_config(tmp_path, dense, "base", entries,
                                                  gate_mode=mode, experts_per_token=k),
                                  tmp_path / "mk", tmp_path)
        mine, ref = mixtral_as_mlp(ours), unfuse_mergekit(theirs)
        assert set(mine) == set(ref)
        assert len(ours) == 21 + 3 * (3 * experts + 1)
        for name, tensor in ref.items():
            assert mine[name].dtype == tensor.dtype and torch.equal(mine[name], tensor), name
        base = read_tensors(dense["base"])
        assert not torch.equal(ours["model.layers.1.block_sparse_moe.experts.1.w2.weight"],
                               read_tensors(dense["b"])["model.layers.1.mlp.down_proj.weight"])
        assert torch.equal(ours["model.layers.2.self_attn.q_proj.weight"],
                           base["model.layers.2.self_attn.q_proj.weight"])
        ours_cfg = json.loads((tmp_path / "rk" / "out" / "config.json").read_text())
        ref_cfg = json.loads((tmp_path / "mk" / "config.json").read_text())
        assert {k: v for k, v in ours_cfg.items() if k != "torch_dtype"} == ref_cfg
        tf.AutoModelForCausalLM.from_pretrained(tmp_path / "rk" / "out")

    def test_qwen2_moe_with_shared_expert(self, cli, tmp_path, dense):
        entries = [{"model": "a", **PROMPTS[0]}, {"model": "b", **PROMPTS[1]}]
        shared = {"model": "base", "positive_prompts": ["hello"], "residual_scale": 0.1}
        ours = run_ok(cli, moe_recipe(tmp_path / "rk", dense, {
            "base": "base", "experts": [dict(e) for e in entries], "shared_experts": [shared],
            "gate_mode": "random", "seed": 42}))
        theirs = run_mergekit_moe(mergekit_config(tmp_path, dense, "base", entries,
                                                  gate_mode="random", architecture="qwen",
                                                  shared_experts=[{
                                                      "source_model": str(dense["base"]),
                                                      "positive_prompts": ["hello"],
                                                      "residual_scale": 0.1}]),
                                  tmp_path / "mk", tmp_path)
        assert set(ours) == set(theirs) and len(ours) == 63
        for name, tensor in theirs.items():
            assert torch.equal(ours[name], tensor), name
        ours_cfg = json.loads((tmp_path / "rk" / "out" / "config.json").read_text())
        ref_cfg = json.loads((tmp_path / "mk" / "config.json").read_text())
        for key in ("architectures", "model_type", "num_experts", "num_experts_per_tok",
                    "shared_expert_intermediate_size", "moe_intermediate_size",
                    "norm_topk_prob", "decoder_sparse_step", "qkv_bias"):
            assert ours_cfg[key] == ref_cfg[key], key
        tf.AutoModelForCausalLM.from_pretrained(tmp_path / "rk" / "out")


def logits(path: Path) -> torch.Tensor:
    model = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


class TestTransformers:
    """Oracle: transformers' own forward pass of the written MoE and of the dense models."""

    @pytest.mark.parametrize("mode,k,experts", [("random", 2, 2), ("uniform_random", 1, 3),
                                                ("random", 2, 4)])
    def test_identical_experts_are_the_dense_base(self, cli, tmp_path, dense, mode, k, experts):
        step = {"base": "base", "experts": [{"model": "base", **PROMPTS[i % 3]}
                                            for i in range(experts)],
                "gate_mode": mode, "experts_per_token": k, "seed": 3,
                "allow_identical_experts": True}
        run_ok(cli, moe_recipe(tmp_path, dense, step))
        config = json.loads((tmp_path / "out" / "config.json").read_text())
        assert config["model_type"] == "mixtral" and config["num_local_experts"] == experts
        diff = (logits(tmp_path / "out") - logits(dense["base"])).abs().max().item()
        assert diff <= 1e-5, diff

    @pytest.mark.parametrize("attention_bias", [False, True])
    def test_qwen3_moe_identical_experts(self, cli, tmp_path, attention_bias):
        """With `attention_bias` (q/k/v/o biases; Qwen3-MoE has the same config key) the
        biases were refused as having "no place" in a Qwen3-MoE; they are carried over."""
        base = make_qwen3(tmp_path / "q3", seed=4, attention_bias=attention_bias)
        step = {"base": "base", "experts": [{"model": "base"}, {"model": "base"}],
                "gate_mode": "random"}
        out = run_ok(cli, moe_recipe(tmp_path / "r", {"base": base}, step))
        config = json.loads((tmp_path / "r" / "out" / "config.json").read_text())
        assert config["model_type"] == "qwen3_moe" and config["moe_intermediate_size"] == 64
        assert "model.layers.0.self_attn.q_norm.weight" in out
        assert "model.layers.2.mlp.experts.1.down_proj.weight" in out
        assert ("model.layers.1.self_attn.o_proj.bias" in out) == attention_bias
        assert config.get("attention_bias", False) == attention_bias
        diff = (logits(tmp_path / "r" / "out") - logits(base)).abs().max().item()
        assert diff <= 1e-5, diff

    def test_one_layer_is_the_routed_mixture(self, cli, tmp_path, dense):
        """Layer 1's sparse block on random inputs = Σ over the top-2 experts of the
        renormalised softmax weight times that dense expert's SwiGLU MLP."""
        step = {"base": "base", "experts": [{"model": n} for n in ("a", "b", "c")],
                "gate_mode": "random", "seed": 9}
        out = run_ok(cli, moe_recipe(tmp_path, dense, step))
        model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        block = model.model.layers[1].mlp
        torch.manual_seed(0)
        x = torch.randn(5, 32)
        with torch.no_grad():
            got = block(x[None])
        got = got[0] if isinstance(got, tuple) else got
        router = out["model.layers.1.block_sparse_moe.gate.weight"]
        probs = torch.softmax(x @ router.T, dim=-1)
        top, idx = probs.topk(2, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        want = torch.zeros_like(x)
        for e, name in enumerate(("a", "b", "c")):
            t = read_tensors(dense[name])
            g, u, d = (t[f"model.layers.1.mlp.{p}.weight"] for p in ("gate_proj", "up_proj",
                                                                      "down_proj"))
            y = (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T
            w = (top * (idx == e)).sum(-1, keepdim=True)
            want += w * y
        assert (got.reshape(5, 32) - want).abs().max().item() <= 1e-5

    def test_qwen2_moe_loads_and_keeps_its_shared_expert(self, cli, tmp_path, dense):
        step = {"base": "base", "experts": [{"model": "a"}, {"model": "b"}],
                "shared_experts": [{"model": "c"}], "gate_mode": "random"}
        out = run_ok(cli, moe_recipe(tmp_path, dense, step))
        c = read_tensors(dense["c"])
        assert torch.equal(out["model.layers.0.mlp.shared_expert.up_proj.weight"],
                           c["model.layers.0.mlp.up_proj.weight"])
        assert out["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 32)
        assert torch.equal(out["model.layers.0.self_attn.k_proj.bias"], torch.zeros(16))
        logits(tmp_path / "out")  # loads and runs


def test_qwen2_base_becomes_qwen2_moe(cli, tmp_path):
    """A Qwen2 base (q/k/v biases, tied embeddings) gives Qwen2-MoE under `auto`; its biases
    are the base's, and transformers loads it with nothing missing."""
    models = {n: make_expert("qwen2", tmp_path / n, seed=20 + i)
              for i, n in enumerate(("base", "a"))}
    step = {"base": "base", "experts": [{"model": "a"}, {"model": "base"}],
            "shared_experts": [{"model": "a", "residual_scale": 0.1}], "gate_mode": "random"}
    out = run_ok(cli, moe_recipe(tmp_path / "r", models, step))
    base = read_tensors(models["base"])
    assert torch.equal(out["model.layers.1.self_attn.q_proj.bias"],
                       base["model.layers.1.self_attn.q_proj.bias"])
    assert "lm_head.weight" not in out
    _, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "out",
                                                      output_loading_info=True)
    assert not any(info.values()), info


@dataclass(frozen=True, eq=False)
class KnownRows(Node):
    """A stand-in prompt gate: row r of layer ``layer`` holds 10·layer + r everywhere."""

    shape: tuple[int, ...]
    dtype: str
    layer: int

    def compute(self, args):
        rows = torch.arange(self.shape[0], dtype=torch.float32) + 10 * self.layer
        return rows[:, None].expand(self.shape).contiguous()


def test_prompt_gates_are_sliced_into_routed_and_shared_rows(cli, tmp_path, dense, monkeypatch):
    """The `moe_gates.prompt_gate_nodes` contract: one fp32 (gates, hidden) node per layer, the
    routed experts' rows then the shared expert's, each cast once to the output dtype. Oracle:
    a stand-in whose rows are known (`KnownRows`)."""
    from recipekit.graph import intern
    from recipekit.steps import moe

    seen = {}

    def fake(step, recipe, base, prompts, mode):
        seen.update(prompts=list(prompts), mode=mode)
        return [intern(KnownRows((len(prompts), 32), "F32", layer)) for layer in range(3)]

    monkeypatch.setattr(moe, "prompt_gate_nodes", fake)
    step = {"base": "base", "experts": [{"model": "a", **PROMPTS[0]},
                                        {"model": "b", **PROMPTS[1]}],
            "shared_experts": [{"model": "c", "positive_prompts": ["shared"]}],
            "gate_mode": "cheap_embed"}
    out = run_ok(cli, moe_recipe(tmp_path, dense, step, output={"dtype": "bfloat16"}))
    assert seen["mode"] == "cheap_embed"
    assert [p.positive for p in seen["prompts"]] == [("def f(x): return x",),
                                                      ("once upon a time",), ("shared",)]
    assert seen["prompts"][1].negative == ("import os",)
    for layer in range(3):
        routed = out[f"model.layers.{layer}.mlp.gate.weight"]
        shared = out[f"model.layers.{layer}.mlp.shared_expert_gate.weight"]
        assert routed.dtype == torch.bfloat16 and routed.shape == (2, 32)
        assert torch.equal(routed.float()[:, 0], torch.tensor([10. * layer, 10. * layer + 1]))
        assert torch.equal(shared.float()[:, 0], torch.tensor([10. * layer + 2]))


class TestModifiers:
    """Oracle: the formulas t + s·N(0,1) and t·r of mergekit-moe's noise_and_scale."""

    def test_noise_and_residual_scale(self, cli, tmp_path, dense):
        step = {"base": "base", "experts": [{"model": "a", "noise_scale": 0.5},
                                            {"model": "b", "residual_scale": 0.25}],
                "gate_mode": "random"}
        out = run_ok(cli, moe_recipe(tmp_path, dense, step))
        a, b = read_tensors(dense["a"]), read_tensors(dense["b"])
        noise = torch.cat([(out[f"model.layers.{i}.block_sparse_moe.experts.0.{w}.weight"]
                            - a[f"model.layers.{i}.mlp.{p}.weight"]).flatten()
                           for i in range(3) for w, p in (("w1", "gate_proj"), ("w3", "up_proj"),
                                                          ("w2", "down_proj"))])
        assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 0.5) < 0.02
        assert torch.equal(out["model.layers.0.block_sparse_moe.experts.1.w2.weight"],
                           b["model.layers.0.mlp.down_proj.weight"] * 0.25)
        assert torch.equal(out["model.layers.0.block_sparse_moe.experts.1.w1.weight"],
                           b["model.layers.0.mlp.gate_proj.weight"])
        again = run_ok(cli, moe_recipe(tmp_path / "again", dense, step))
        assert all(torch.equal(out[n], again[n]) for n in out)  # seeded: deterministic


class TestAdapterExperts:
    """Oracle: PEFT's merge_and_unload of the same adapter into the base."""

    def test_adapter_expert_is_the_peft_merged_mlp(self, cli, tmp_path, dense):
        lora = make_adapter("llama", dense["base"], tmp_path / "lora", seed=7, r=4,
                            target_modules=["gate_proj", "up_proj", "down_proj"])
        ref, _ = peft_merged("llama", dense["base"], [(lora, 1.0)])
        step = {"base": "base", "experts": [{"model": "a"}, {"adapter": "lora"}],
                "gate_mode": "random"}
        out = run_ok(cli, moe_recipe(tmp_path / "short", dense, step, adapters={"lora": lora}))
        base = read_tensors(dense["base"])
        for i in range(3):
            for w, p in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                got = out[f"model.layers.{i}.block_sparse_moe.experts.1.{w}.weight"]
                want = ref[f"model.layers.{i}.mlp.{p}.weight"]
                assert (got - want).abs().max().item() <= 1e-6
                assert not torch.equal(got, base[f"model.layers.{i}.mlp.{p}.weight"])
        # the same expert as an explicit `op: adapters` step: the same bytes
        doc = yaml.safe_load((tmp_path / "short" / "recipe.yaml").read_text())
        doc["steps"].insert(0, {"name": "folded", "op": "adapters", "from": "base",
                                "adapters": ["lora"]})
        doc["steps"][1]["experts"][1] = {"model": "folded"}
        (tmp_path / "step").mkdir()
        (tmp_path / "step" / "recipe.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        via_step = run_ok(cli, tmp_path / "step" / "recipe.yaml")
        assert all(torch.equal(out[n], via_step[n]) for n in out)


class TestRefusals:
    """Oracle: mergekit-moe's config checks (reference/moe.md §1.2), reported before anything
    is written, located at the step's keys."""

    @pytest.mark.parametrize("step,message", [
        ({"experts": [{"model": "a"}], "experts_per_token": 2, "gate_mode": "random"},
         "steps[0].experts_per_token: experts_per_token is 2 but there are 1 expert(s)"),
        ({"experts": [{"model": "a"}, {"model": "b", "positive_prompts": ["x"]}],
          "gate_mode": "uniform_random"},
         "steps[0].experts[0]: expert has no positive_prompts, which gate_mode uniform_random "
         "needs"),
        ({"experts": [{"model": "a", "positive_prompts": ["x"]},
                      {"model": "a", "positive_prompts": ["y"]}], "gate_mode": "cheap_embed"},
         "steps[0].experts: every expert is the same model, which is useless without training"),
        ({"experts": [{"model": "a"}, {"model": "b"}], "gate_mode": "random",
          "shared_experts": [{"model": "c"}], "architecture": "mixtral"},
         "steps[0].shared_experts: architecture mixtral has no shared expert"),
        ({"experts": [{"model": "a"}, {"model": "q"}], "gate_mode": "random"},
         "steps[0].experts[1]: expert experts.1 is a 'qwen3' model but the base is 'llama'"),
        ({"experts": [{"model": "a"}, {"model": "b"}], "gate_mode": "random",
          "architecture": "qwen3_moe"},
         "steps[0].base: base 'base' is a 'llama' model; qwen3_moe is built from qwen3 models"),
    ])
    def test_refused(self, cli, tmp_path, dense, step, message):
        models = dict(dense)
        if "q" in json.dumps(step):
            models["q"] = make_qwen3(tmp_path / "q3", seed=1)
        recipe = moe_recipe(tmp_path / "r", models, {"base": "base", **step})
        result = cli("run", recipe, "-q")
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert "Traceback" not in result.output
        assert not (tmp_path / "r" / "out" / "model.safetensors").exists()


def refused(cli, recipe: Path) -> str:
    """`recipekit run` of ``recipe``: exit 2, no traceback, nothing written; its stderr."""
    result = cli("run", recipe, "-q")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not (recipe.parent / "out" / "model.safetensors").exists()
    return result.stderr


class TestBiases:
    """A base bias the output architecture has no parameter for is refused: mergekit drops it
    and the model breaks (reference/moe.md §6.1), and a kept one transformers drops as an
    unexpected key. Oracle: transformers' modules (Mixtral's attention and every MoE's MLPs
    have no bias, Qwen2-MoE's q/k/v do, its o_proj does not): what is accepted loads with no
    missing or unexpected key."""

    STEP = {"base": "base", "experts": [{"model": "base"}, {"model": "base"}],
            "gate_mode": "random"}

    def test_attention_biases_are_refused_for_mixtral(self, cli, tmp_path):
        """A Llama's `attention_bias` gives o_proj a bias too, which Qwen2-MoE lacks: the
        refusal no longer suggests `architecture: qwen2_moe`, which led to the next case."""
        models = {"base": make_expert("llama", tmp_path / "base", seed=1, attention_bias=True)}
        recipe = moe_recipe(tmp_path / "r", models, self.STEP)
        assert f"{recipe}:7:9: steps[0].base: base 'base' has biases that a mixtral model " \
            "has no place for (`self_attn.k_proj.bias`, `self_attn.o_proj.bias`, " \
            "`self_attn.q_proj.bias`, `self_attn.v_proj.bias` in its layers, first " \
            "model.layers.0.self_attn.k_proj.bias); use a base without those biases\n" \
            in refused(cli, recipe)

    def test_an_o_proj_bias_is_refused_for_qwen2_moe(self, cli, tmp_path):
        """The same base with a shared expert (`auto` → Qwen2-MoE) was written with its o_proj
        biases, which transformers dropped (unexpected keys): logits 0.54 off (found by a
        black-box check)."""
        models = {"base": make_expert("llama", tmp_path / "base", seed=1, attention_bias=True)}
        step = {**self.STEP, "shared_experts": [{"model": "base"}]}
        recipe = moe_recipe(tmp_path / "r", models, step)
        assert "steps[0].base: base 'base' has biases that a qwen2_moe model has no place " \
            "for (`self_attn.o_proj.bias` in its layers, first " \
            "model.layers.0.self_attn.o_proj.bias); use a base without those biases\n" \
            in refused(cli, recipe)

    def test_an_experts_mlp_biases_are_refused_a_bases_are_not(self, cli, tmp_path):
        """Experts with `mlp_bias: true` were written without their MLP biases, silently
        (logits 0.92 off the dense model with identical experts), while a base's MLP biases,
        which never reach the output, were refused (found by a black-box check)."""
        plain = make_expert("llama", tmp_path / "plain", seed=1)
        biased = make_expert("llama", tmp_path / "biased", seed=2, mlp_bias=True)
        recipe = moe_recipe(tmp_path / "r", {"base": plain, "e": biased},
                            {**self.STEP, "experts": [{"model": "base"}, {"model": "e"}]})
        assert "steps[0].experts[1]: this expert has MLP biases (model.layers.0.mlp." \
            in refused(cli, recipe)
        recipe = moe_recipe(tmp_path / "r2", {"base": biased, "e": plain},
                            {**self.STEP, "experts": [{"model": "e"}, {"model": "e"}]})
        run_ok(cli, recipe)

    def test_qkv_biases_go_to_qwen2_moe_as_the_refusal_says(self, cli, tmp_path):
        """A Llama-family base with q/k/v biases only: Mixtral is refused with the way out,
        and following it gives a Qwen2-MoE that holds those biases and loads with nothing
        missing or unexpected."""
        from safetensors.torch import load_file, save_file

        base = make_expert("llama", tmp_path / "base", seed=1, attention_bias=True)
        tensors = load_file(base / "model.safetensors")
        save_file({n: t for n, t in tensors.items() if not n.endswith("o_proj.bias")},
                  base / "model.safetensors", metadata={"format": "pt"})
        recipe = moe_recipe(tmp_path / "r", {"base": base}, self.STEP)
        assert "; use a base without those biases, or `architecture: qwen2_moe` with one " \
            "shared expert (`shared_experts: [{model: ...}]`)\n" in refused(cli, recipe)
        step = {**self.STEP, "architecture": "qwen2_moe", "shared_experts": [{"model": "base"}]}
        out = run_ok(cli, moe_recipe(tmp_path / "q", {"base": base}, step))
        for proj in ("q_proj", "k_proj", "v_proj"):
            name = f"model.layers.1.self_attn.{proj}.bias"
            assert torch.equal(out[name], tensors[name]), name
        assert not [n for n in out if n.endswith("o_proj.bias")]
        _, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "q" / "out",
                                                          output_loading_info=True)
        assert not any(info.values()), info


class TestAutoArchitecture:
    """`architecture: auto` picks by the base's family (reference/moe.md §2.1); the shared
    expert is then checked against the pick, as for an explicit architecture. Oracles:
    mergekit-moe, which finds no output for either case (its only Qwen2 output needs a shared
    expert, its only Qwen3 output has none); transformers, which random-initialised the
    missing shared expert of the Qwen2-MoE written before and dropped the Qwen3-MoE's (found by
    a black-box check)."""

    @staticmethod
    def case(tmp_path: Path, family: str) -> tuple[dict[str, Path], dict]:
        if family == "qwen2":
            models = {"base": make_expert("qwen2", tmp_path / "base", seed=1),
                      "b": make_expert("qwen2", tmp_path / "b", seed=2)}
            return models, {"base": "base", "experts": [{"model": "b"}, {"model": "base"}],
                            "gate_mode": "random"}
        models = {"base": make_qwen3(tmp_path / "base", seed=1),
                  "b": make_qwen3(tmp_path / "b", seed=2)}
        return models, {"base": "base", "experts": [{"model": "b"}, {"model": "base"}],
                        "shared_experts": [{"model": "b"}], "gate_mode": "random"}

    @pytest.mark.parametrize("family,message", [
        ("qwen2", ":8:9: steps[0].base: base 'base' is a 'qwen2' model, for which "
         "`architecture: auto` writes qwen2_moe (mergekit-moe's only MoE output for qwen2 "
         "models); qwen2_moe needs one shared expert (it always has one); add "
         "`shared_experts: [{model: ...}]`\n"),
        ("qwen3", ":13:3: steps[0].shared_experts: base 'base' is a 'qwen3' model, for which "
         "`architecture: auto` writes qwen3_moe (mergekit-moe's only MoE output for qwen3 "
         "models); qwen3_moe has no shared expert; drop `shared_experts`\n"),
    ], ids=["qwen2-without-shared", "qwen3-with-shared"])
    def test_refused(self, cli, tmp_path, family, message):
        models, step = self.case(tmp_path, family)
        recipe = moe_recipe(tmp_path / "r", models, step)
        assert f"{recipe}{message}" in refused(cli, recipe)

    @needs_mergekit
    @pytest.mark.parametrize("family", ["qwen2", "qwen3"])
    def test_mergekit_refuses_too(self, tmp_path, family):
        models, step = self.case(tmp_path, family)
        config = mergekit_config(tmp_path, models, "base", [dict(e) for e in step["experts"]],
                                 gate_mode="random", **({"shared_experts": [{
                                     "source_model": str(models["b"])}]}
                                     if "shared_experts" in step else {}))
        with pytest.raises(AssertionError, match="No output architecture found that is "
                                                 "compatible with the given models"):
            run_mergekit_moe(config, tmp_path / "mk", tmp_path)


class TestOutputDtype:
    """An `output.dtype` other than the base's: every expert tensor is its source cast once,
    as mergekit-moe casts it to its `dtype` (reference/moe.md §6.7). An fp32 expert in a bf16
    base's MoE written as float32 was rounded to bf16 first (found by a black-box check)."""

    @pytest.fixture
    def bf16(self, tmp_path, dense) -> dict[str, Path]:
        return {"base": make_expert("llama", tmp_path / "bf16", seed=5, dtype=torch.bfloat16),
                "a": dense["a"]}

    STEP = {"base": "base", "experts": [{"model": "a"}, {"model": "base"}],
            "gate_mode": "random", "seed": 42}

    def test_a_wider_output_keeps_the_experts_bits(self, cli, tmp_path, bf16):
        out = run_ok(cli, moe_recipe(tmp_path / "r", bf16, self.STEP,
                                     output={"dtype": "float32"}))
        a = read_tensors(bf16["a"])
        for layer in range(3):
            for w, p in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                got = out[f"model.layers.{layer}.block_sparse_moe.experts.0.{w}.weight"]
                assert torch.equal(got, a[f"model.layers.{layer}.mlp.{p}.weight"]), (layer, w)

    @needs_mergekit
    def test_equals_mergekit(self, cli, tmp_path, bf16):
        ours = run_ok(cli, moe_recipe(tmp_path / "r", bf16, self.STEP,
                                      output={"dtype": "float32"}))
        theirs = run_mergekit_moe(mergekit_config(
            tmp_path, bf16, "base", [dict(e) for e in self.STEP["experts"]],
            gate_mode="random", dtype="float32"), tmp_path / "mk", tmp_path)
        mine, ref = mixtral_as_mlp(ours), unfuse_mergekit(theirs)
        assert set(mine) == set(ref)
        for name, tensor in ref.items():
            assert mine[name].dtype == tensor.dtype and torch.equal(mine[name], tensor), name


def test_hidden_last_is_hidden(cli, tmp_path, dense):
    """mergekit-moe's `hidden_last` is its `hidden` (router.py; reference/moe.md §1.1), and
    the recipe takes it too (it was refused with "did you mean 'hidden_avg'?", a mode that
    routes differently): the same output, byte for byte."""
    step = {"base": "base", "experts": [{"model": "a", **PROMPTS[0]},
                                        {"model": "b", **PROMPTS[1]}]}
    hidden = run_ok(cli, moe_recipe(tmp_path / "h", dense, {**step, "gate_mode": "hidden"}))
    last = run_ok(cli, moe_recipe(tmp_path / "l", dense, {**step, "gate_mode": "hidden_last"}))
    assert set(hidden) == set(last)
    assert all(torch.equal(hidden[n], last[n]) for n in hidden)


def test_an_adapter_experts_errors_are_one_located_paragraph(cli, tmp_path, dense):
    """A LoRA trained on another intermediate size: one error at the expert's `adapter` key,
    not one per tensor at `steps[0].adapters[0]` (a key the moe step has not; found by a
    black-box check)."""
    other = make_model("llama", tmp_path / "i48", layers=3, seed=1, intermediate_size=48)
    lora = make_adapter("llama", other, tmp_path / "lora", seed=7, r=4,
                        target_modules=["gate_proj", "up_proj", "down_proj"])
    step = {"base": "base", "experts": [{"model": "a"}, {"adapter": "lora"}],
            "gate_mode": "random"}
    recipe = moe_recipe(tmp_path / "r", dense, step, adapters={"lora": lora})
    assert refused(cli, recipe) == (
        f"{recipe}:15:14: steps[0].experts[1].adapter: adapter 'lora' updates "
        "`model.layers.0.mlp.down_proj.weight` as [32, 48], but it is [32, 64] in 'base' (and "
        "8 more tensors like it); the adapter was trained on a model of other dimensions (or "
        "vocabulary size)\n      - adapter: lora\n                 ^\n")


def test_a_base_no_moe_architecture_is_built_from_is_refused(cli, tmp_path):
    """`architecture: auto` wrote a Gemma base as a Mixtral: its (1 + w) norms and embedding
    scale have no place there, and an MoE of experts equal to the base gave logits 5.5 away
    from the base's (found by a black-box check). mergekit-moe refuses ("No output
    architecture found that is compatible")."""
    models = {"base": make_model("gemma", tmp_path / "base", layers=2, seed=1)}
    step = {"base": "base", "experts": [{"model": "base"}, {"model": "base"}],
            "gate_mode": "random"}
    result = cli("validate", moe_recipe(tmp_path / "r", models, step))
    assert result.exit_code == 2, result.output
    assert "steps[0].base: base 'base' is a 'gemma' model, which no MoE architecture " \
        "recipekit writes is built from (mixtral: llama, mistral;" in result.stderr


def test_a_sliding_window_base_gives_a_model_that_runs(cli, tmp_path):
    """A Qwen2 base with sliding-window layers: Qwen2-MoE's config (as mergekit writes it)
    sets `sliding_window: null` but kept the base's sliding `layer_types`, and transformers
    failed in the forward pass (found by a black-box check). The output attends fully, said
    in a warning. Oracle: transformers loads it and its logits are finite."""
    from transformers import AutoModelForCausalLM

    base = make_expert("qwen2", tmp_path / "base", seed=1, use_sliding_window=True,
                       max_window_layers=1, sliding_window=4)
    step = {"base": "base", "experts": [{"model": "base"}, {"model": "base"}],
            "shared_experts": [{"model": "base"}], "gate_mode": "random"}
    result = cli("run", moe_recipe(tmp_path / "r", {"base": base}, step), "-q")
    assert result.exit_code == 0, result.output
    assert "sliding-window layers; the qwen2_moe output attends fully" in result.stderr
    out = tmp_path / "r" / "out"
    config = json.loads((out / "config.json").read_text())
    assert set(config["layer_types"]) == {"full_attention"} and config["sliding_window"] is None
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(12)[None] % 64).logits).all()


def test_plan_streams_expert_copies(cli, tmp_path, dense):
    """Every expert tensor is a plain copy of its source (a `load` node written as is) and the
    plan's peak is the copy buffers plus a router (`steps.moe.RNG_KERNELS`)."""
    step = {"base": "base", "experts": [{"model": n} for n in ("a", "b")],
            "gate_mode": "random"}
    recipe = moe_recipe(tmp_path, dense, step)
    result = cli("plan", recipe, "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    nodes = {n["id"]: n for n in doc["nodes"]}
    written = {t["name"]: nodes[t["node"]] for s in doc["shards"] for t in s["tensors"]}
    experts = {n: v for n, v in written.items() if ".experts." in n}
    assert len(experts) == 3 * 2 * 3 and all(v["op"] == "load" for v in experts.values())
    routers = [v for n, v in written.items() if n.endswith("gate.weight")]
    assert len(routers) == 3 and all(v["op"] != "load" for v in routers)
    assert doc["estimates"]["peak_memory"] < 6 << 20  # the router's draw and torch's RNG code


@pytest.mark.parametrize("mode,noise", [("random", None), ("uniform_random", 0.01)])
def test_measured_peak_within_the_plan_estimate(tmp_path, mode, noise):
    """A run of streamed copies and routers (and a noised expert, row pieces) stays within
    `plan`'s peak estimate. Oracle: VmHWM of a fresh process (tests/helpers/memory.py), as for
    the merge methods in tests/run/test_execute_estimates.py."""
    import subprocess
    import sys

    from tests.helpers.builders import make_model
    from tests.helpers.memory import MEASURE

    base = make_model("llama", tmp_path / "base", layers=2, seed=0, dtype=torch.bfloat16,
                      hidden_size=1024, intermediate_size=4096, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=128, vocab_size=256)
    recipe = moe_recipe(tmp_path / "r", {"base": base}, {
        "base": "base", "experts": [{"model": "base", "positive_prompts": ["a"]}, {
            "model": "base", "positive_prompts": ["b"],
            **({"noise_scale": noise, "residual_scale": 0.5} if noise else {})}],
        "gate_mode": mode, "allow_identical_experts": True})
    done = subprocess.run([sys.executable, "-c", MEASURE, str(recipe)], capture_output=True,
                          text=True, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["measured"] <= got["estimate"], got

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
from adapter_builders import make_adapter, peft_merged

from builders import load_model, make_model
from conftest import read_tensors, write_recipe

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
    "layers_to_transform": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                          layers_to_transform=[0])),
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
    if case == "embedding_modules_to_save":
        assert {"model.embed_tokens.weight", "lm_head.weight"} <= changed


@pytest.mark.parametrize("case", ["rslora_patterns", "dora", "gpt2_dora", "lora_bias"])
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

"""`output.dtype` rounds a computed tensor once, to the output dtype (issue 16 item 3).

Oracle: the fp32 computation. A bf16 checkpoint widened to fp32 holds the same values exactly,
and every kernel computes in fp32 whatever its inputs' dtype, so a bf16 merge, interpolation,
coalescing or LoRA fold written with ``output.dtype: float32`` must be bit for bit the same
recipe run on the fp32-widened inputs (no `output.dtype`). Before the fix the node was first
rounded to bf16 and then widened: every value sat on the bf16 grid. Tensors that are only moved
(`Load`) are cast as before, and a recipe without `output.dtype` keeps its bytes (the goldens).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recipekit.graph import Cast, load, round_to

from tests.helpers.adapter_builders import make_adapter
from tests.helpers.builders import load_model, make_model, read_tensors
from tests.helpers.recipes import write_recipe


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """bf16 base/x/y Llamas, their fp32 widenings (``*32``) and a LoRA adapter of the base."""
    d = tmp_path_factory.mktemp("rounding")
    out: dict[str, Path] = {}
    for name, seed in (("base", 0), ("x", 1), ("y", 2)):
        out[name] = make_model("llama", d / name, layers=2, seed=seed, dtype=torch.bfloat16)
        load_model("llama", out[name]).to(torch.float32).save_pretrained(d / f"{name}32")
        out[f"{name}32"] = d / f"{name}32"
    out["lora"] = make_adapter("llama", out["base32"], d / "lora", seed=3, r=4, lora_alpha=8,
                               target_modules=["q_proj", "v_proj"])
    return out


STEPS = {
    "linear": "op: merge\n    method: linear\n    from: [{model: x, weight: 0.3}, "
              "{model: y, weight: 0.7}]",
    "slerp": "op: merge\n    method: slerp\n    from: [x, y]\n    parameters: {t: 0.3}",
    "ties": "op: merge\n    method: ties\n    base: base\n    from: [{model: x, weight: 0.6, "
            "density: 0.5}, {model: y, weight: 0.4, density: 0.7}]",
    "interpolate": "op: interpolate\n    from: [x, y]\n    alpha: 0.3",
    "lora": "op: adapters\n    from: base\n    adapters: [{use: lora}]",
    "coalesce": "op: coalesce\n    from: x\n    depth: [[0, 1]]",
}


def _run(cli, directory: Path, models: dict[str, Path], step: str, suffix: str,
         dtype: str | None) -> dict[str, torch.Tensor]:
    directory.mkdir()
    text = (f"recipekit: 1\nmodels:\n  base: {models['base' + suffix]}\n"
            f"  x: {models['x' + suffix]}\n  y: {models['y' + suffix]}\n"
            f"adapters:\n  lora: {models['lora']}\n"
            f"steps:\n  - name: s\n    {step}\noutput:\n  path: ./out\n"
            + (f"  dtype: {dtype}\n" if dtype else ""))
    result = cli("run", write_recipe(directory, text), "-q", "--no-fsync")
    assert result.exit_code == 0, result.output
    return read_tensors(directory / "out")


@pytest.mark.parametrize("op", list(STEPS))
def test_bf16_inputs_written_as_fp32_are_the_fp32_result(cli, tmp_path, models, op):
    wide = _run(cli, tmp_path / "wide", models, STEPS[op], "", "float32")
    exact = _run(cli, tmp_path / "exact", models, STEPS[op], "32", None)
    assert wide.keys() == exact.keys()
    off_grid = 0
    for name, got in wide.items():
        assert got.dtype == torch.float32, name
        assert torch.equal(got, exact[name]), (op, name)
        off_grid += int((got.to(torch.bfloat16).float() != got).sum())
    assert off_grid > 0, "every value on the bf16 grid: rounded to bf16 first"


def test_fp16_output_rounds_the_fp32_result_once(cli, tmp_path, models):
    wide = _run(cli, tmp_path / "half", models, STEPS["linear"], "", "float16")
    exact = _run(cli, tmp_path / "exact", models, STEPS["linear"], "32", None)
    for name, got in wide.items():
        assert torch.equal(got, exact[name].to(torch.float16)), name


def test_loads_are_still_cast_and_computed_nodes_retyped():
    node = load("m", "w", (2, 2), "BF16")
    assert round_to(node, "F32") == Cast(node, "F32")
    assert round_to(node, "BF16") is node


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory) -> dict[str, Path]:
    """base, base2 (64 rows, 64 tokens) and chat (66 rows: ChatML's two added tokens)."""
    from tests.helpers.vocab_models import make_vocab_model

    d = tmp_path_factory.mktemp("vocab")
    return {"base": make_vocab_model(d / "base", rows=64, added=[], seed=1),
            "base2": make_vocab_model(d / "base2", rows=64, added=[], seed=3),
            "chat": make_vocab_model(d / "chat", rows=66, added=["<|im_start|>", "<|im_end|>"],
                                     seed=2)}


VOCAB_STEPS = {
    "layers_64_config_66": ("op: layers\n    from: base\n    layers: [0, {from: chat, range: "
                            "[1, 2]}]", "chat", 66, 64),
    "layers_66_config_64": ("op: layers\n    from: chat\n    layers: [0, {from: base, range: "
                            "[1, 2]}]", "base", 64, 66),
    "interpolate_64_config_66": ("op: interpolate\n    from: [base, base2]\n    alpha: 0.5",
                           "chat", 66, 64),
}


@pytest.mark.parametrize("case", list(VOCAB_STEPS))
def test_a_config_donor_of_another_vocabulary_size_is_refused(cli, tmp_path, vocab_models,
                                                                case):
    """Oracle: transformers refuses config.json's vocab_size against other table rows. Before
    the fix the run wrote such a checkpoint (and the donor's tokenizer) with exit 0."""
    step, donor, size, rows = VOCAB_STEPS[case]
    text = (f"recipekit: 1\nmodels:\n  base: {vocab_models['base']}\n"
            f"  base2: {vocab_models['base2']}\n"
            f"  chat: {vocab_models['chat']}\nsteps:\n  - name: s\n    {step}\n"
            f"output:\n  path: ./out\n  config: {donor}\n")
    r = write_recipe(tmp_path, text)
    result = cli("validate", r)
    assert result.exit_code == 2, result.output
    first = result.stderr.splitlines()[0]
    line = text.splitlines().index(f"  config: {donor}") + 1
    assert first.startswith(f"{r}:{line}:11: output.config: ")
    assert f"'{donor}' has a vocabulary of {size} tokens" in first
    assert f"vocabulary tables (embeddings, LM head) have {rows} rows" in first
    assert f"align the vocabularies in a `merge` or `interpolate` step with `tokenizer: " \
        f"{donor}`" in first
    assert cli("run", r, "-q").exit_code == 2
    assert not (tmp_path / "out").exists()


def test_an_aligned_vocabulary_takes_any_config_donor(cli, tmp_path, vocab_models):
    """Oracle: AutoTokenizer and AutoModel load the output; `<|im_start|>` encodes within
    the table. The union of base and chat has 66 tokens; config.json comes from base (64)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = (f"recipekit: 1\nmodels:\n  base: {vocab_models['base']}\n"
            f"  chat: {vocab_models['chat']}\nsteps:\n  - name: s\n    op: merge\n"
            "    method: linear\n    from: [base, chat]\n    parameters: {weight: 1.0}\n"
            "    tokenizer: union\noutput:\n  path: ./out\n  config: base\n")
    result = cli("run", write_recipe(tmp_path, text), "-q")
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(tok) == 66 == model.config.vocab_size
    assert model.get_input_embeddings().weight.shape[0] == 66
    assert tok.convert_tokens_to_ids("<|im_start|>") == 64

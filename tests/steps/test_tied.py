"""A tied model (no `lm_head.weight` stored) merged or interpolated with an untied one
(recipekit/steps/tied.py; merge.py and interpolate.py call it).

Oracles: mergekit 0.1.5, whose tied model loads its embedding table for the missing head
(reference/tokenizers.md §3.3), on picollamas with and without `tokenizer:` (every tensor
bit for bit); transformers forward passes of the output against a hand merge in torch where
the tied model's head is its embedding table, for each family whose `tied` map names the head.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.builders import make_model, read_tensors
from tests.helpers.mergekit import needs_mergekit, run_mergekit
from tests.helpers.recipes import write_recipe
from tests.helpers.vocab_models import make_vocab_model

#: family -> (embedding table, head) names
TABLES = {"llama": ("model.embed_tokens.weight", "lm_head.weight"),
          "qwen2": ("model.embed_tokens.weight", "lm_head.weight"),
          "gemma": ("model.embed_tokens.weight", "lm_head.weight"),
          "gpt2": ("transformer.wte.weight", "lm_head.weight")}


@pytest.fixture(scope="module")
def picollamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tied base (64 rows), an untied model of the same vocabulary and an untied chat model
    with two added tokens (66 rows)."""
    root = tmp_path_factory.mktemp("tied")
    return {
        "tied": make_vocab_model(root / "tied", rows=64, added=[], seed=1, tied=True),
        "untied": make_vocab_model(root / "untied", rows=64, added=[], seed=2),
        "chat": make_vocab_model(root / "chat", rows=66, added=["<|im_start|>", "<|im_end|>"],
                                 seed=3),
    }


def _run(cli, tmp_path: Path, models: dict[str, Path], step: str, out: str = "out") -> Path:
    text = ("recipekit: 1\nmodels:\n" + "".join(f"  {n}: {p}\n" for n, p in models.items())
            + "steps:\n  - name: mixed\n" + "".join(f"    {line}\n" for line in
                                                    step.strip().splitlines())
            + f"output: {{path: {tmp_path / out}, dtype: float32}}\n")
    result = cli("run", str(write_recipe(tmp_path, text)))
    assert result.exit_code == 0, result.output
    return tmp_path / out


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


#: (recipekit step, mergekit config, models in mergekit's `models:` order)
MK_CASES = {
    "linear": ("op: merge\nmethod: linear\nfrom: [tied, untied]\nparameters: {weight: 1.0}",
               "merge_method: linear\n", ["tied", "untied"]),
    "untied_first": ("op: merge\nmethod: linear\nfrom: [untied, tied]\n"
                     "parameters: {weight: 1.0}", "merge_method: linear\n", ["untied", "tied"]),
    "ties_tied_base": ("op: merge\nmethod: ties\nbase: tied\nfrom: [untied, chat]\n"
                       "parameters: {weight: 1.0, density: 0.5}\ntokenizer: union",
                       "merge_method: ties\nparameters: {density: 0.5}\n"
                       "tokenizer_source: union\n", ["untied", "chat"]),
    "union": ("op: merge\nmethod: linear\nfrom: [tied, chat]\nparameters: {weight: 1.0}\n"
              "tokenizer: union", "merge_method: linear\ntokenizer_source: union\n",
              ["tied", "chat"]),
}


@needs_mergekit
@pytest.mark.mergekit
@pytest.mark.parametrize("case", list(MK_CASES))
def test_same_tensors_as_mergekit(cli, tmp_path, picollamas, case):
    """Oracle: mergekit 0.1.5 (base_model: the tied model) in fp32: the same tensor names
    (`lm_head.weight` written) and every tensor bit for bit. Its config keeps the donor's
    `tie_word_embeddings: true`; recipekit's says false, so transformers loads the head.
    Before, recipekit refused: "`lm_head.weight` is in 'untied' but not in 'tied'"."""
    step, mk, names = MK_CASES[case]
    ours = _run(cli, tmp_path, picollamas, step)
    cfg = tmp_path / "mk.yml"
    cfg.write_text(f"base_model: {picollamas['tied']}\nmodels:\n" + "".join(
        f"  - model: {picollamas[n]}\n    parameters: {{weight: 1.0}}\n" for n in names)
        + mk + "dtype: float32\n")
    theirs = run_mergekit(cfg, tmp_path / "mk", tmp_path)
    got = read_tensors(ours)
    assert sorted(got) == sorted(theirs) and "lm_head.weight" in got
    for name, tensor in theirs.items():
        assert torch.equal(got[name], tensor), name
    assert _config(tmp_path / "mk")["tie_word_embeddings"] is True
    assert _config(ours)["tie_word_embeddings"] is False


def _hand_model(untied: Path, tensors: dict[str, torch.Tensor]):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(untied, dtype=torch.float32).eval()
    missing, unexpected = ref.load_state_dict(tensors, strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("attn.bias")]
    return ref


def _assert_same_logits(ours: Path, ref, vocab: int) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 7, 9, 12, vocab - 1]])
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("op", ["merge", "interpolate"])
@pytest.mark.parametrize("family", list(TABLES))
def test_transformers_runs_the_output_as_the_hand_merge(cli, tmp_path, family, op):
    """Oracle: transformers. The hand merge (mean, or fp32 lerp at α = 0.25) of the tied
    model, with its embedding table as its head, and the untied one, loaded into the untied
    model's class: the same logits. The head is stored and `tie_word_embeddings` is false."""
    tied = make_model(family, tmp_path / "tied", layers=2, seed=1, tie_word_embeddings=True)
    untied = make_model(family, tmp_path / "untied", layers=2, seed=2,
                        tie_word_embeddings=False)
    step = ("op: merge\nmethod: linear\nfrom: [tied, untied]\nparameters: {weight: 1.0}"
            if op == "merge" else "op: interpolate\nfrom: [tied, untied]\nalpha: 0.25")
    out = _run(cli, tmp_path, {"tied": tied, "untied": untied}, step)
    table, head = TABLES[family]
    a, b = load_file(tied / "model.safetensors"), load_file(untied / "model.safetensors")
    assert head not in a and head in b
    a[head] = a[table]
    hand = {k: (a[k] + b[k]) / 2 if op == "merge" else torch.lerp(a[k], b[k], 0.25)
            for k in b if b[k].is_floating_point()}
    assert head in read_tensors(out)
    assert _config(out)["tie_word_embeddings"] is False
    _assert_same_logits(out, _hand_model(untied, hand), b[table].shape[0])


def test_interpolate_with_a_tokenizer_aligns_the_stand_in_head(cli, tmp_path, picollamas):
    """Oracle: transformers and the alignment rules (tokenizers.md §3.2-3.3): the tied model's
    head is its embedding table, permuted like it (chat's rows for chat's two tokens), lerped
    with chat's head."""
    out = _run(cli, tmp_path, {"tied": picollamas["tied"], "chat": picollamas["chat"]},
               "op: interpolate\nfrom: [tied, chat]\nalpha: 0.25\ntokenizer: union")
    a = load_file(picollamas["tied"] / "model.safetensors")
    c = load_file(picollamas["chat"] / "model.safetensors")
    a["lm_head.weight"] = a["model.embed_tokens.weight"]
    hand = {}
    for k, v in c.items():
        mine = torch.cat([a[k], v[64:]]) if v.shape[0] == 66 else a[k]
        hand[k] = torch.lerp(mine, v, 0.25)
    got = read_tensors(out)
    assert torch.equal(got["lm_head.weight"], hand["lm_head.weight"])
    assert _config(out)["tie_word_embeddings"] is False and _config(out)["vocab_size"] == 66
    _assert_same_logits(out, _hand_model(picollamas["chat"], hand), 66)


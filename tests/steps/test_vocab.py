"""Vocabulary alignment (`tokenizer:` on merge and interpolate; recipekit/steps/vocab.py).

Oracles: mergekit 0.1.5 on the configs of its own tests/test_tokenizer.py, on models made as
its tests/common.py makes them (the same token → id map, added-token flags, vocab_size, every
embedding and LM-head row per token in fp32, and `AutoTokenizer` encoding a sample text to the
same ids); transformers loading a union merge of two tiny Llamas, whose logits must equal
those of the merge computed by hand; the whole-tensor evaluation for the streamed row pieces.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.mergekit import needs_mergekit, run_mergekit
from tests.helpers.recipes import write_recipe
from tests.helpers.vocab_models import make_tokenizer, make_vocab_model

SAMPLE = "<|im_start|>user _tok_5 _tok_7<|im_end|> <s>_tok_10</s> <UNUSED_1>"


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """mergekit's three test models: base (64 rows), chatml (66 rows, two added tokens),
    padded (64 rows, four added tokens at ids 64-67, beyond its vocab size)."""
    root = tmp_path_factory.mktemp("vocab_models")
    return {
        "base": make_vocab_model(root / "model_base", rows=64, added=[], seed=1),
        "chatml": make_vocab_model(root / "model_chatml", rows=66,
                                   added=["<|im_start|>", "<|im_end|>"], seed=2),
        "padded": make_vocab_model(root / "model_padded", rows=64,
                                   added=[f"<UNUSED_{i}>" for i in range(4)], seed=3),
    }


def _recipe(tmp_path: Path, models: dict[str, Path], names: list[str], step: str,
            out: str = "out") -> Path:
    lines = ["recipekit: 1", "models:"] + [f"  {n}: {models[n]}" for n in names]
    lines += ["steps:", "  - name: merged", "    op: merge"] + ["    " + x for x in
                                                               step.strip().splitlines()]
    lines += ["output:", f"  path: {tmp_path / out}", "  dtype: float32"]
    return write_recipe(tmp_path, "\n".join(lines) + "\n")


def _mergekit(tmp_path: Path, text: str) -> Path:
    cfg = tmp_path / "mk.yml"
    cfg.write_text(text + "dtype: float32\n")
    run_mergekit(cfg, tmp_path / "mk", tmp_path)
    return tmp_path / "mk"


def _rows(path: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab(), load_file(path / "model.safetensors")


def assert_same_as_mergekit(ours: Path, theirs: Path, *, atol: float = 0.0) -> float:
    """Same vocabulary, flags, vocab_size, shapes and rows per token; returns the largest row
    difference."""
    from transformers import AutoTokenizer

    ta, tb = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(theirs)
    va, vb = ta.get_vocab(), tb.get_vocab()
    assert va == vb
    assert {i: str(t) for i, t in ta.added_tokens_decoder.items()} == \
        {i: str(t) for i, t in tb.added_tokens_decoder.items()}
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (ours, theirs))
    assert ca["vocab_size"] == cb["vocab_size"]
    wa, wb = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    worst = 0.0
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert wa[name].shape == wb[name].shape, name
        for token, i in va.items():
            worst = max(worst, (wa[name][i] - wb[name][vb[token]]).abs().max().item())
        if wa[name].shape[0] > len(va):  # padding rows
            torch.testing.assert_close(wa[name][len(va):], wb[name][len(vb):], atol=1e-6, rtol=0)
    assert worst <= atol, worst
    assert ta(SAMPLE)["input_ids"] == tb(SAMPLE)["input_ids"]
    return worst


def _mk_models(models: dict[str, Path], names: list[str], base: str | None = None) -> str:
    head = f"base_model: {models[base]}\n" if base else ""
    return head + "models:\n" + "".join(
        f"  - model: {models[n]}\n    parameters: {{weight: 1.0}}\n" for n in names)


LINEAR3 = "method: linear\nfrom: [base, padded, chatml]\nparameters: {weight: 1.0}\n"
LINEAR2 = "method: linear\nfrom: [base, chatml]\nparameters: {weight: 1.0}\n"

#: (recipekit step, mergekit config, models): mergekit's tests/test_tokenizer.py cases
CASES = {
    "source_base": (LINEAR3 + "tokenizer: base", "merge_method: linear\ntokenizer_source: base\n",
                    ["base", "padded", "chatml"]),
    "source_union": (LINEAR3 + "tokenizer: union",
                     "merge_method: linear\ntokenizer_source: union\n",
                     ["base", "padded", "chatml"]),
    "source_model": (LINEAR3 + "tokenizer: chatml",
                     "merge_method: linear\ntokenizer_source: {chatml}\n",
                     ["base", "padded", "chatml"]),
    "slerp_union": ("method: slerp\nfrom: [base, chatml]\nparameters: {t: 0.5}\n"
                    "tokenizer: union",
                    "merge_method: slerp\nparameters: {{t: 0.5}}\ntokenizer_source: union\n",
                    ["base", "chatml"]),
    "force_token": (LINEAR2 + "tokenizer:\n  source: union\n  tokens:\n"
                    "    _tok_10: {model: chatml, force: true}\n"
                    "    _tok_11: {model: base, force: true}",
                    "merge_method: linear\ntokenizer:\n  source: union\n  tokens:\n"
                    "    _tok_10: {{source: {chatml}, force: true}}\n"
                    "    _tok_11: {{source: {base}, force: true}}\n", ["base", "chatml"]),
    "model_token": (LINEAR2 + "tokenizer:\n  source: base\n  tokens:\n"
                    "    _tok_20: {model: chatml, token_id: 64, force: true}\n"
                    "    _tok_21: {model: base, token: \"<s>\", force: true}",
                    "merge_method: linear\ntokenizer:\n  source: base\n  tokens:\n"
                    "    _tok_20:\n      source: {{kind: model_token, model: {chatml}, "
                    "token_id: 64}}\n      force: true\n"
                    "    _tok_21:\n      source: {{kind: model_token, model: {base}, "
                    "token: \"<s>\"}}\n      force: true\n", ["base", "chatml"]),
    "pad_to_multiple_of": ("method: linear\nfrom: [chatml]\nparameters: {weight: 1.0}\n"
                           "tokenizer: {source: base, pad_to_multiple_of: 16}",
                           "merge_method: linear\ntokenizer:\n  source: base\n"
                           "  pad_to_multiple_of: 16\n", ["chatml"]),
}


@needs_mergekit
@pytest.mark.mergekit
@pytest.mark.parametrize("case", list(CASES))
def test_same_vocabulary_and_rows_as_mergekit(cli, tmp_path, vocab_models, case):
    """Oracle: mergekit 0.1.5 with the base as `base_model` (the tokenizer base), in fp32."""
    step, mk, names = CASES[case]
    base = "chatml" if case == "pad_to_multiple_of" else "base"
    r = _recipe(tmp_path, vocab_models, names, step)
    result = cli("run", str(r))
    assert result.exit_code == 0, result.output
    theirs = _mergekit(tmp_path, _mk_models(vocab_models, names, base)
                       + mk.format(**{k: str(v) for k, v in vocab_models.items()}))
    # slerp's coefficients round differently by the last bit; every other row is a copy or
    # the same sums in the same order
    assert_same_as_mergekit(tmp_path / "out", theirs, atol=1e-6 if case == "slerp_union" else 0)


def test_union_rows_follow_the_rules(cli, tmp_path, vocab_models):
    """Oracle: the rules written out (tokenizers.md §3.2): shared tokens are the mean of the
    own rows, chatml's two tokens its rows for every model, padded's `<UNUSED_*>` (beyond its
    vocab size) absent; vocab_size, tokenizer files and the generation config follow."""
    r = _recipe(tmp_path, vocab_models, ["base", "padded", "chatml"], CASES["source_union"][0])
    result = cli("run", str(r))
    assert result.exit_code == 0, result.output
    vocab, out = _rows(tmp_path / "out")
    ins = {n: load_file(vocab_models[n] / "model.safetensors") for n in vocab_models}
    assert len(vocab) == 66 and vocab["<|im_start|>"] == 64 and "<UNUSED_0>" not in vocab
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        b, p, c = (ins[n][name] for n in ("base", "padded", "chatml"))
        assert torch.equal(out[name][:64], (b[:64] + p[:64] + c[:64]) / 3)
        torch.testing.assert_close(out[name][64:], c[64:], atol=2e-7, rtol=0)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 66
    decoder = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert decoder["added_tokens_decoder"]["65"]["content"] == "<|im_end|>"
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 2


def test_transformers_loads_a_union_merge_and_its_logits_match_a_hand_merge(
        cli, tmp_path, vocab_models):
    """Oracle: transformers. The hand merge is the mean of every tensor, with chatml's rows
    for its two tokens in the base; logits of a prompt of shared tokens must agree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = _recipe(tmp_path, vocab_models, ["base", "chatml"],
                LINEAR2 + "tokenizer: union")
    result = cli("run", str(r))
    assert result.exit_code == 0, result.output
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    base = load_file(vocab_models["base"] / "model.safetensors")
    chatml = load_file(vocab_models["chatml"] / "model.safetensors")
    hand = {}
    for name, c in chatml.items():
        b = base[name]
        if c.shape[0] == 66 and c.dim() == 2:
            b = torch.cat([b, c[64:]])
        hand[name] = (b + c) / 2
    ref = AutoModelForCausalLM.from_pretrained(vocab_models["chatml"], dtype=torch.float32).eval()
    ref.load_state_dict(hand)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[1, 5, 7, 9, 12]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    assert tok.convert_ids_to_tokens([64, 65]) == ["<|im_start|>", "<|im_end|>"]


def test_streamed_row_pieces_equal_the_whole_gather(cli, tmp_path, vocab_models, monkeypatch):
    """Oracle: the same recipe evaluated whole. With tiny pieces (2 rows) and the padding mean
    streamed from the files, the output bytes are the same: each piece reads only the rows it
    names (run/execute.py `gather_rows`)."""
    import recipekit.plan.cost as cost

    step = LINEAR3 + "tokenizer: {source: union, pad_to_multiple_of: 16}"
    whole = _recipe(tmp_path, vocab_models, ["base", "padded", "chatml"], step, out="whole")
    assert cli("run", str(whole)).exit_code == 0
    monkeypatch.setattr(cost, "CHUNK_ELEMS", 64)
    monkeypatch.setattr(cost, "HOLD_BYTES", 0)
    pieces = _recipe(tmp_path, vocab_models, ["base", "padded", "chatml"], step, out="pieces")
    result = cli("run", str(pieces))
    assert result.exit_code == 0, result.output
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("whole", "pieces"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["lm_head.weight"].shape == (80, 32)
    torch.testing.assert_close(a["lm_head.weight"][66:],
                               a["lm_head.weight"][:66].mean(0).expand(14, 32))


def test_interpolate_aligns_too(cli, tmp_path, vocab_models):
    """Oracle: the rule (chatml's rows for its own tokens, lerp of the shared rows)."""
    text = (f"recipekit: 1\nmodels:\n  a: {vocab_models['base']}\n  b: {vocab_models['chatml']}\n"
            "steps:\n  - {name: mid, op: interpolate, from: [a, b], alpha: 0.25,\n"
            "     tokenizer: union}\n"
            f"output: {{path: {tmp_path / 'out'}}}\n")
    result = cli("run", str(write_recipe(tmp_path, text)))
    assert result.exit_code == 0, result.output
    out = load_file(tmp_path / "out" / "model.safetensors")["model.embed_tokens.weight"]
    a = load_file(vocab_models["base"] / "model.safetensors")["model.embed_tokens.weight"]
    b = load_file(vocab_models["chatml"] / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(out[:64], torch.lerp(a, b[:64], 0.25))
    assert torch.equal(out[64:], b[64:])


def test_differing_vocabularies_without_the_key_name_it(cli, tmp_path, vocab_models):
    r = _recipe(tmp_path, vocab_models, ["base", "chatml"], LINEAR2)
    result = cli("validate", str(r))
    assert result.exit_code == 2
    assert "add `tokenizer: union` (or `base`, or a model's name) to the step to align the " \
        "vocabularies" in result.stderr


def test_a_slow_only_tokenizer_is_refused_with_the_fix(cli, tmp_path, vocab_models):
    import shutil

    slow = tmp_path / "slow"
    shutil.copytree(vocab_models["chatml"], slow)
    (slow / "tokenizer.json").unlink()
    (slow / "tokenizer.model").write_bytes(b"\x00")
    models = dict(vocab_models, chatml=slow)
    r = _recipe(tmp_path, models, ["base", "chatml"], LINEAR2 + "tokenizer: union")
    result = cli("validate", str(r))
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == (
        f"{r}:11:16: steps[0].tokenizer: model 'chatml' has only a slow tokenizer "
        "(tokenizer.model, no tokenizer.json); aligning vocabularies reads the fast-tokenizer "
        "file: convert it once with transformers (`AutoTokenizer.from_pretrained(dir)"
        ".save_pretrained(dir)` writes tokenizer.json) and run again")
    assert "Traceback" not in result.output


def test_unknown_source_and_rule_models_are_located(cli, tmp_path, vocab_models):
    r = _recipe(tmp_path, vocab_models, ["base", "chatml"], LINEAR2
                + "tokenizer:\n  source: nope\n  tokens: {x: {model: other}}")
    result = cli("validate", str(r))
    assert result.exit_code == 2
    assert "steps[0].tokenizer.source: tokenizer source 'nope' is not one of this step's " \
        "models" in result.stderr
    assert "steps[0].tokenizer.tokens.x: 'other' is not one of this step's models" \
        in result.stderr


def test_the_plan_hash_follows_the_tokenizer(cli, tmp_path, vocab_models):
    """A changed input tokenizer changes the built tokenizer, hence the plan hash: a rerun
    does not resume an output made from the old one."""
    import shutil

    import recipekit

    chatml = tmp_path / "chatml"
    shutil.copytree(vocab_models["chatml"], chatml)
    r = _recipe(tmp_path, dict(vocab_models, chatml=chatml), ["base", "chatml"],
                LINEAR2 + "tokenizer: union")
    def plan_hash() -> str:
        recipe, _ = recipekit.api._load(r, None)
        return recipekit.api._compile(recipe, None).plan_hash()

    before = plan_hash()
    data = json.loads((chatml / "tokenizer.json").read_text())
    data["added_tokens"][-1]["special"] = True
    (chatml / "tokenizer.json").write_text(json.dumps(data))
    assert plan_hash() != before


def test_import_mergekit_converts_the_tokenizer_block(cli, tmp_path, vocab_models, monkeypatch):
    """`import-mergekit` turns mergekit's `tokenizer:` (model_token by id and by token, a
    forced model source, zero, padding) into the merge step's `tokenizer:`, and the recipe
    runs; the rows are those of the mergekit parity cases above."""
    import yaml

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "mk.yml"
    cfg.write_text(
        f"base_model: {vocab_models['base']}\nmodels:\n"
        f"  - model: {vocab_models['base']}\n  - model: {vocab_models['chatml']}\n"
        "merge_method: task_arithmetic\nparameters: {weight: 0.5}\ndtype: float32\n"
        "tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n  tokens:\n"
        f"    _tok_20: {{source: {{kind: model_token, model: {vocab_models['chatml']}, "
        "token_id: 64}, force: true}\n"
        f"    _tok_21: {{source: {{kind: model_token, model: {vocab_models['base']}, "
        "token: \"<s>\"}}\n"
        f"    _tok_22: {{source: {vocab_models['chatml']}, force: true}}\n"
        "    _tok_23: {source: {kind: zero}}\n")
    out = tmp_path / "recipe.yaml"
    result = cli("import-mergekit", str(cfg), "-o", str(out))
    assert result.exit_code == 0, result.output
    step = yaml.safe_load(out.read_text())["steps"][0]
    assert step["tokenizer"] == {"source": "union", "pad_to_multiple_of": 8, "tokens": {
        "_tok_20": {"model": "model_chatml", "token_id": 64, "force": True},
        "_tok_21": {"model": "model_base", "token": "<s>"},
        "_tok_22": {"model": "model_chatml", "force": True},
        "_tok_23": {"zero": True}}}
    result = cli("run", str(out))
    assert result.exit_code == 0, result.output


def test_the_lock_pins_a_non_donor_models_tokenizer(cli, tmp_path, vocab_models):
    """Oracle: `run --frozen` refuses once the tokenizer of a model that is not the config
    donor (chatml: the output's tokens 64-65 come from it) changed after `recipekit lock`."""
    import shutil

    chatml = tmp_path / "chatml"
    shutil.copytree(vocab_models["chatml"], chatml)
    r = _recipe(tmp_path, dict(vocab_models, chatml=chatml), ["base", "chatml"],
                LINEAR2 + "tokenizer: union")
    assert cli("lock", str(r)).exit_code == 0
    lock = json.loads((tmp_path / "recipe.lock.json").read_text())
    assert "tokenizer.json" in lock["inputs"]["models.chatml"]["files"]
    path = chatml / "tokenizer.json"
    path.write_text(path.read_text().replace("<|im_end|>", "<|im_stop|>"))
    result = cli("run", str(r), "-q", "--frozen")
    assert result.exit_code == 2
    assert "models.chatml" in result.stderr and "tokenizer.json" in result.stderr


def _swapped(base: Path, out: Path) -> Path:
    """A copy of ``base`` whose tokenizer gives `<s>` and `_tok_40` each other's ids."""
    import shutil

    shutil.copytree(base, out)
    data = json.loads((out / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["<s>"], vocab["_tok_40"] = 40, 1
    for t in data["added_tokens"]:
        t["id"] = vocab.get(t["content"], t["id"])
    data["added_tokens"].sort(key=lambda t: t["id"])
    (out / "tokenizer.json").write_text(json.dumps(data))
    return out


def test_a_source_with_other_ids_moves_rows_and_token_ids(cli, tmp_path, vocab_models):
    """Oracle: the permutation written out. `swapped` is the base model with `<s>` and
    `_tok_40` exchanging ids (tokenizer and rows); with `tokenizer: swapped` the output takes
    its ids, so `<s>` is row 40 = mean of base row 1 and swapped row 40, and config.json's and
    generation_config.json's `bos_token_id` (the donor base's 1) become 40."""
    from safetensors.torch import save_file

    swapped = _swapped(vocab_models["base"], tmp_path / "swapped")
    tensors = load_file(swapped / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        t = tensors[name].clone()
        t[[1, 40]] = t[[40, 1]] + 1.0  # the same tokens, other rows (shifted: told apart)
        tensors[name] = t
    save_file(tensors, swapped / "model.safetensors", metadata={"format": "pt"})
    r = _recipe(tmp_path, dict(vocab_models, swapped=swapped), ["base", "swapped"],
                "method: linear\nfrom: [base, swapped]\nparameters: {weight: 1.0}\n"
                "tokenizer: swapped")
    result = cli("run", str(r))
    assert result.exit_code == 0, result.output
    vocab_out, out = _rows(tmp_path / "out")
    assert vocab_out["<s>"] == 40 and vocab_out["_tok_40"] == 1
    base = load_file(vocab_models["base"] / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(out[name][40], (base[name][1] + tensors[name][40]) / 2)
        assert torch.equal(out[name][1], (base[name][40] + tensors[name][1]) / 2)
    for f in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "out" / f).read_text())["bos_token_id"] == 40, f


def test_output_config_ids_are_mapped_through_its_own_tokenizer(cli, tmp_path, vocab_models):
    """`output.config` naming another model while a step aligned the vocabulary kept that
    model's token ids as written: here `<s>` is its id 40, which in the output is `_tok_40`
    (found by a black-box check: bos 63 named a word, pad 64 an added chat token). Its ids
    now go through its own tokenizer into the output's (`<s>` is 1 there), in config.json and
    in its generation_config.json, which the output takes with its config."""
    swapped = _swapped(vocab_models["base"], tmp_path / "swapped")
    for f in ("config.json", "generation_config.json"):
        doc = json.loads((swapped / f).read_text())
        doc["bos_token_id"] = 40
        (swapped / f).write_text(json.dumps(doc))
    r = _recipe(tmp_path, dict(vocab_models, swapped=swapped), ["base", "chatml", "swapped"],
                LINEAR2 + "tokenizer: union")
    r.write_text(r.read_text() + "  config: swapped\n")
    result = cli("run", str(r), "-q")
    assert result.exit_code == 0, result.output
    vocab_out, _ = _rows(tmp_path / "out")
    assert vocab_out["<s>"] == 1 and vocab_out["_tok_40"] == 40
    for f in ("config.json", "generation_config.json"):
        doc = json.loads((tmp_path / "out" / f).read_text())
        assert doc["bos_token_id"] == 1 and doc["eos_token_id"] == vocab_out["</s>"], (f, doc)


def test_an_output_config_without_a_generation_config_gets_none(cli, tmp_path, vocab_models):
    """`output.config` naming a model without generation_config.json while a step aligned the
    vocabulary got the step's donor's (its sampling settings included) beside the config
    donor's config.json (found by a hole-finder); without alignment it got none, as now."""
    donor = _swapped(vocab_models["base"], tmp_path / "donor")
    (donor / "generation_config.json").unlink()
    r = _recipe(tmp_path, dict(vocab_models, donor=donor), ["base", "chatml", "donor"],
                LINEAR2 + "tokenizer: union")
    r.write_text(r.read_text() + "  config: donor\n")
    result = cli("run", str(r), "-q")
    assert result.exit_code == 0, result.output
    assert (vocab_models["base"] / "generation_config.json").exists()
    assert not (tmp_path / "out" / "generation_config.json").exists()


@pytest.mark.parametrize("source, order, meant", [
    ("base", "[chatml, base]", "model 'chatml's tokenizer"),
    ("union", "[chatml, union]", "every model's tokens"),
])
def test_a_keyword_source_that_is_also_a_model_is_refused(cli, tmp_path, vocab_models, source,
                                                         order, meant):
    """`tokenizer: base` took the step's first model (the keyword) where a model of the step is
    named `base`, silently (found by a black-box check); `union` likewise. Refused, exit 2,
    with the fix; `base` naming the step's base model itself stays fine."""
    models = {"chatml": vocab_models["chatml"], source: vocab_models["base"]}
    r = _recipe(tmp_path, models, ["chatml", source],
                f"method: linear\nfrom: {order}\nparameters: {{weight: 1.0}}\n"
                f"tokenizer: {source}")
    result = cli("validate", "--no-inputs", str(r))
    assert result.exit_code == 2, result.output
    assert (f"steps[0].tokenizer: tokenizer source '{source}' is a keyword ({meant}) and also "
            f"the name of one of this step's models; rename model '{source}'") in result.stderr


@pytest.mark.parametrize("source, meant", [("base", "model 'chatml's tokenizer"),
                                           ("union", "every model's tokens")])
def test_a_keyword_source_that_is_also_a_step_is_refused_naming_the_step(
        cli, tmp_path, vocab_models, source, meant):
    """A step named `base` (or `union`) merged with `tokenizer: base`: the refusal told the user
    to "rename model 'base' in `models:`", where there is none (found by a black-box check).
    It names the step."""
    r = write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{chatml: {vocab_models['chatml']}, x: {vocab_models['base']}}}
        steps:
          - {{name: {source}, op: merge, method: linear, from: [chatml, x],
              parameters: {{weight: 0.5}}, tokenizer: union}}
          - {{name: s, op: merge, method: linear, from: [chatml, {source}],
              parameters: {{weight: 0.5}}, tokenizer: {source}}}
        """)
    result = cli("validate", "--no-inputs", str(r))
    assert result.exit_code == 2, result.output
    assert (f"steps[1].tokenizer: tokenizer source '{source}' is a keyword ({meant}) and also "
            f"the name of the step '{source}' this step merges; rename step '{source}' (its "
            "`name:` and where it is used) to take its tokenizer, or write the keyword's model "
            "by name") in result.stderr
    assert "`models:`" not in result.stderr


def test_tokenizer_names_are_checked_from_the_recipe_alone(cli, tmp_path, vocab_models):
    """`validate --no-inputs` (the pre-commit hook) finds a source naming no model of the step."""
    r = _recipe(tmp_path, vocab_models, ["base", "chatml"], LINEAR2 + "tokenizer: padded")
    result = cli("validate", "--no-inputs", str(r))
    assert result.exit_code == 2
    assert "steps[0].tokenizer: tokenizer source 'padded' is not one of this step's models" \
        in result.stderr


def test_a_step_aligns_an_earlier_aligned_step_with_another_model(cli, tmp_path, vocab_models):
    """Oracle: the rules on the first step's output. Its tokenizer is the one it built (66
    tokens), its tables are computed (the gather is computed whole), and `padded`'s rows come
    after alignment to the same 66 tokens; the output's files are the last alignment's."""
    text = (f"recipekit: 1\nmodels:\n  base: {vocab_models['base']}\n"
            f"  chatml: {vocab_models['chatml']}\n  padded: {vocab_models['padded']}\n"
            "steps:\n"
            "  - {name: first, op: merge, method: linear, from: [base, chatml],\n"
            "     parameters: {weight: 1.0}, tokenizer: union}\n"
            "  - {name: second, op: interpolate, from: [first, padded], alpha: 0.5,\n"
            "     tokenizer: {source: union, pad_to_multiple_of: 8}}\n"
            f"output: {{path: {tmp_path / 'out'}, dtype: float32}}\n")
    result = cli("run", str(write_recipe(tmp_path, text)))
    assert result.exit_code == 0, result.output
    vocab, out = _rows(tmp_path / "out")
    assert len(vocab) == 66 and vocab["<|im_end|>"] == 65
    ins = {n: load_file(vocab_models[n] / "model.safetensors") for n in vocab_models}
    name = "lm_head.weight"
    first = torch.cat([(ins["base"][name] + ins["chatml"][name][:64]) / 2,
                       ins["chatml"][name][64:]])
    padded = torch.cat([ins["padded"][name], first[64:]])  # lacks 64-65: first's rows
    want = torch.lerp(first, padded, 0.5)
    torch.testing.assert_close(out[name][:66], want, atol=1e-7, rtol=0)
    assert out[name].shape == (72, 32)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 72


def _other_family(family: str, path: Path, rows: int, added: list, seed: int) -> Path:
    """A GPT-2 (tied `wte`, 32 learned positions: fewer than its 64 tokens) or BERT masked LM
    (positions, two token types, an LM-head bias over the vocabulary) with the tokenizer of
    `make_vocab_model`, every value random so that a row from the wrong table shows."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=rows, n_embd=32, n_layer=2, n_head=4,
                                           n_positions=32))
    else:
        model = BertForMaskedLM(BertConfig(vocab_size=rows, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=48,
                                           max_position_embeddings=40))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.save_pretrained(path)
    make_tokenizer(64, added).save_pretrained(path)  # type: ignore[attr-defined]
    return path


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_position_and_token_type_tables_are_not_vocabularies(cli, tmp_path, family):
    """GPT-2's `wpe` and BERT's position and token-type tables are indexed by position, not by
    token (tokenizers.md §3.1: mergekit never permutes them): a union merge averages them as
    they are, while the token rows (and BERT's LM-head bias) follow the tokens. Before, they
    were permuted like vocabularies: GPT-2 with fewer positions than tokens lost tokens and
    would not load, BERT was refused. Oracle: the rows by token string, and transformers."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    a = _other_family(family, tmp_path / "a", 64, [], seed=1)
    b = _other_family(family, tmp_path / "b", 66, ["<|im_start|>", "<|im_end|>"], seed=2)
    r = _recipe(tmp_path, {"a": a, "b": b}, ["a", "b"], LINEAR2.replace("base, chatml", "a, b")
                + "tokenizer: union")
    result = cli("run", str(r))
    assert result.exit_code == 0, result.output
    out, ins = load_file(tmp_path / "out" / "model.safetensors"), [
        load_file(p / "model.safetensors") for p in (a, b)]
    vocab = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    assert len(vocab) == 66
    by_token = ["transformer.wte.weight"] if family == "gpt2" else [
        "bert.embeddings.word_embeddings.weight", "cls.predictions.bias"]
    for name in by_token:
        assert out[name].shape[0] == 66
        assert torch.equal(out[name][:64], (ins[0][name] + ins[1][name][:64]) / 2)
        torch.testing.assert_close(out[name][64:], ins[1][name][64:], atol=2e-7, rtol=0)
    for name in [n for n in out if n not in by_token]:  # positions, token types, the rest
        assert torch.equal(out[name], (ins[0][name] + ins[1][name]) / 2), name
    auto = AutoModelForCausalLM if family == "gpt2" else AutoModelForMaskedLM
    auto.from_pretrained(tmp_path / "out")  # loads: every shape where the config says


def _with_template(src: Path, dst: Path, where: str, text: str, *, named: bool = False) -> Path:
    """A copy of ``src`` with ``text`` as its chat template in chat_template.jinja (``jinja``)
    or tokenizer_config.json's key (``config``), or none (``none``); ``named`` adds a named
    template (additional_chat_templates/tool_use.jinja)."""
    import shutil

    shutil.copytree(src, dst)
    if where == "jinja":
        (dst / "chat_template.jinja").write_text(text)
    elif where == "config":
        cfg = json.loads((dst / "tokenizer_config.json").read_text())
        cfg["chat_template"] = text
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    if named:
        (dst / "additional_chat_templates").mkdir()
        (dst / "additional_chat_templates" / "tool_use.jinja").write_text(text + " TOOLS")
    return dst


DONOR_T = "{% for m in messages %}DONOR {{ m['content'] }}{% endfor %}"
SOURCE_T = "{% for m in messages %}SOURCE {{ m['content'] }}{% endfor %}"


@pytest.mark.parametrize(("donor_at", "source_at"), [
    ("none", "jinja"), ("jinja", "none"), ("jinja", "jinja"), ("jinja", "config"),
    ("config", "jinja")])
def test_the_chat_template_goes_with_the_tokenizer_source(cli, tmp_path, vocab_models, donor_at,
                                                          source_at):
    """Oracle: mergekit 0.1.5 saves the source tokenizer with its own template (reference
    tokenizers.md §4: `tok.save_pretrained` of the built tokenizer), wherever the source keeps
    it; AutoTokenizer reads the output's. The config donor (base, first model) has another
    template, in chat_template.jinja or tokenizer_config.json, and named templates: none of
    them reaches the output. Before the fix the donor's chat_template.jinja was copied beside
    chatml's tokenizer (and won), and chatml's own chat_template.jinja was lost."""
    from transformers import AutoTokenizer

    models = dict(vocab_models,
                  base=_with_template(vocab_models["base"], tmp_path / "b", donor_at, DONOR_T,
                                      named=True),
                  chatml=_with_template(vocab_models["chatml"], tmp_path / "c", source_at,
                                        SOURCE_T))
    r = _recipe(tmp_path, models, ["base", "chatml"], LINEAR2 + "tokenizer: chatml")
    result = cli("run", str(r))
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    want = None if source_at == "none" else SOURCE_T
    assert tok.chat_template == want
    assert not (tmp_path / "out" / "additional_chat_templates").exists()


@pytest.mark.parametrize("has_role", [True, False])
def test_a_donor_token_id_the_output_lacks_takes_the_sources_own(cli, tmp_path, vocab_models,
                                                                has_role):
    """Oracle: the output tokenizer (AutoTokenizer). `eot` is base with `</s>` renamed `_tok_2`
    (id 2) and `_tok_9` renamed `<|endoftext|>`, its eos token. With `tokenizer: eot` the
    output vocabulary has no `</s>`: the donor base's `eos_token_id` 2 becomes eot's own eos
    id 9 in config.json and generation_config.json; without an eos token in eot, a warning
    names the key. Before the fix it stayed 2 (`_tok_2`) silently."""
    import shutil

    from transformers import AutoTokenizer

    eot = tmp_path / "eot"
    shutil.copytree(vocab_models["base"], eot)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        text = (eot / name).read_text().replace('"</s>"', '"_tok_2"')
        (eot / name).write_text(text.replace('"_tok_9"', '"<|endoftext|>"'))
    doc = json.loads((eot / "tokenizer_config.json").read_text())
    doc.pop("eos_token", None)
    if has_role:
        doc["eos_token"] = "<|endoftext|>"
    (eot / "tokenizer_config.json").write_text(json.dumps(doc))
    r = _recipe(tmp_path, dict(vocab_models, eot=eot), ["base", "eot"],
                "method: linear\nfrom: [base, eot]\nparameters: {weight: 1.0}\n"
                "tokenizer: eot")
    result = cli("run", str(r))
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.convert_ids_to_tokens(2) == "_tok_2"
    for f in ("config.json", "generation_config.json"):
        doc = json.loads((tmp_path / "out" / f).read_text())
        if has_role:
            assert tok.eos_token == "<|endoftext|>"
            assert doc["eos_token_id"] == tok.eos_token_id == 9, f
        else:
            assert doc["eos_token_id"] == 2, f
            assert f"{f} `eos_token_id` 2 is the donor's token '</s>', which the output " \
                "vocabulary lacks, and the tokenizer source has no eos_token" in result.stderr


def test_a_source_without_tokenizer_config_gets_one_with_its_added_tokens(cli, tmp_path,
                                                                            vocab_models):
    """Oracle: the output's tokenizer.json and transformers. `nocfg` is chatml without
    tokenizer_config.json; with `tokenizer: nocfg` the output still gets the README's
    `tokenizer_config.json` with an `added_tokens_decoder` (one entry per added token of
    tokenizer.json, same flags), not the donor base's file (which describes another
    tokenizer), and AutoTokenizer loads the output as it loads `nocfg` itself. Before, the
    donor's file was copied, without the key."""
    import shutil

    from transformers import AutoTokenizer

    nocfg = tmp_path / "nocfg"
    shutil.copytree(vocab_models["chatml"], nocfg)
    (nocfg / "tokenizer_config.json").unlink()
    r = _recipe(tmp_path, dict(vocab_models, nocfg=nocfg), ["base", "nocfg"],
                "method: linear\nfrom: [base, nocfg]\nparameters: {weight: 1.0}\n"
                "tokenizer: nocfg")
    result = cli("run", str(r))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    added = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    doc = json.loads((out / "tokenizer_config.json").read_text())
    assert doc == {"added_tokens_decoder": {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                         "single_word", "special")} for t in added}}
    assert [t["content"] for t in added] == ["<unk>", "<s>", "</s>", "<|im_start|>",
                                             "<|im_end|>"]
    ours, theirs = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(nocfg)
    assert ours.get_vocab() == theirs.get_vocab()
    assert {i: str(t) for i, t in ours.added_tokens_decoder.items()} == \
        {i: str(t) for i, t in theirs.added_tokens_decoder.items()}
    assert ours(SAMPLE)["input_ids"] == theirs(SAMPLE)["input_ids"]

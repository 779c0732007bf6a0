"""mergekit 0.1.5's own configs, converted by `recipekit import-mergekit`, run by both tools and
compared tensor by tensor (marker `mergekit`: needs the side venv, bench/setup_mergekit.sh).

Cases: every config of mergekit's `examples/` and the merge configs of its test suite
(`tests/test_basic_merges.py`: TestBasicMerges' Llama configs, TestGraniteMerges, the GPT-2
copy/stack; the VLM configs are in test_mergekit_import.py). They are transcribed from the
mirror at commit a6e4028 (the PyPI wheel of 0.1.5 ships neither folder; mergekit's version there
is 0.1.5), with hub names mapped to synthetic models made as mergekit's tests make them:
transformers' `LlamaForCausalLM` / `GraniteForCausalLM` / `GPT2LMHeadModel` at random init
(seeded here), picollama-sized (2 layers; 40 for the examples, whose layer ranges reach 40).
Tokenizer and chat-template configs (test_tokenizer.py, test_chat_template.py) belong to the
tokenizer issue and are not here.

Each case runs twice: **fp32** (fp32 models, `dtype: float32`) and **bf16** (bf16 models, the
config's own `dtype`). What must hold:

* fp32, deterministic methods: every tensor bit-identical to mergekit's (all 31 are: both
  compute in fp32 with the same operations in the same order).
* bf16: every deterministic case bit-identical too: imported recipes carry mergekit's
  `compute_dtype`, so the inputs are cast to bf16 and merged in it as mergekit does (which, for
  the TIES family, decides which elements survive). Four cases differ, each with its reason in
  `BF16_DIFFERS` (strict xfail): karcher, ramplus_tl, arcee_fusion (twice) and sce (tie rule).
* random methods (dare_*, della): keep-rate of the task vector and its spread (std) agree with
  mergekit's within sampling noise; the masks come from other generators.
* refusals: the case's reason is named (README lists them).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers.builders import read_tensors
from tests.helpers.mergekit import MERGEKIT_PYTHON, MERGEKIT_VENV, needs_mergekit
from tests.helpers.ties import assert_equal_outside_band, compile_recipe, plan_bands

pytestmark = [pytest.mark.mergekit, needs_mergekit]
DRIVER = Path(__file__).resolve().parents[1] / "goldens" / "run_mergekit_cases.py"


def _two(method: str, base: str | None = None, params: str = "") -> str:
    """mergekit's TestBasicMerges.two_model_config: a 0.6 / b 0.4, dtype bfloat16."""
    return ("models:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n"
            "  - model: {b}\n    parameters: {{weight: 0.4}}\n"
            f"merge_method: {method}\n" + (f"base_model: {{{base}}}\n" if base else "")
            + (f"parameters: {{{{{params}}}}}\n" if params else "") + "dtype: bfloat16\n")


SUITE = {
    "passthrough_scale": "models:\n  - model: {a}\n    parameters:\n      scale:\n"
                         "        - filter: o_proj\n          value: 0\n        - value: 1\n"
                         "merge_method: passthrough\n",
    "linear": _two("linear"),
    "slerp": _two("slerp", "a", "t: 0.35"),
    **{f"nuslerp_{'base' if b else 'nobase'}_row{int(r)}_flat{int(f)}":
       _two("nuslerp", "c" if b else None, f"nuslerp_row_wise: {str(r).lower()}, "
            f"nuslerp_flatten: {str(f).lower()}")
       for b in (False, True) for r in (False, True) for f in (False, True)},
    "nuslerp_zero_sum": _two("nuslerp", "c", "nuslerp_row_wise: false, nuslerp_flatten: false")
    .replace("weight: 0.6", "weight: -0.5").replace("weight: 0.4", "weight: 0.5"),
    "task_arithmetic": _two("task_arithmetic", "c"),
    "breadcrumbs": _two("breadcrumbs", "c"),
    "ties": _two("ties", "c", "density: 0.3"),
    "sce": _two("sce", "c", "select_topk: 0.5"),
    "ram": _two("ram", "c"),
    "ramplus_tl": _two("ramplus_tl", "c", "r: 0.05, alpha: 1.0"),
    "multislerp": _two("multislerp", "c"),
    "dare_ties": _two("dare_ties", "c", "density: 0.66"),
    "model_stock": _two("model_stock", "a").replace("{a}\n    parameters: {{weight: 0.6}}",
                                                    "{b}\n    parameters: {{weight: 0.6}}", 1)
    .replace("{b}\n    parameters: {{weight: 0.4}}", "{c}\n    parameters: {{weight: 0.4}}"),
    "arcee_fusion": _two("arcee_fusion", "a"),
    "nearswap": _two("nearswap", "a", "t: 0.0001"),
    "della": _two("della", "c", "density: 0.66, epsilon: 0.05, lambda: 0.5"),
    "della_invalid_epsilon": _two("della", "c", "density: 0.66, epsilon: 1.35, lambda: 0.5"),
    "karcher": _two("karcher", "c", "max_iter: 5, tol: 1e-5"),
    "granite_copy": "models:\n  - model: {ga}\nmerge_method: passthrough\ndtype: bfloat16\n",
    "granite_linear": "models:\n  - model: {ga}\n    parameters: {{weight: 0.6}}\n"
                      "  - model: {gb}\n    parameters: {{weight: 0.4}}\n"
                      "merge_method: linear\ndtype: bfloat16\n",
    "granite_slerp": "models:\n  - model: {ga}\n  - model: {gb}\nmerge_method: slerp\n"
                     "base_model: {ga}\nparameters: {{t: 0.5}}\ndtype: bfloat16\n",
    "gpt2_copy": "models:\n  - model: {g2}\nmerge_method: passthrough\ndtype: bfloat16\n",
    "gpt2_stack": "slices:\n" + "  - sources:\n      - model: {g2}\n        layer_range: [0, 12]\n"
                  * 2 + "merge_method: passthrough\ndtype: bfloat16\n",
}
SUITE["model_stock_filterwise"] = SUITE["model_stock"].replace(
    "dtype:", "parameters: {{filter_wise: true}}\ndtype:")

EXAMPLES = {  # examples/*.yml, hub names -> tiny 40-layer Llamas
    "ex_arcee_fusion": "models:\n  - model: {A}\n  - model: {B}\nmerge_method: arcee_fusion\n"
                       "base_model: {A}\ndtype: bfloat16\n",
    "ex_bio_merge": "models:\n  - model: {A}\n    parameters:\n      density: 0.5\n"
                    "      weight: 0.5\n  - model: {B}\n    parameters:\n      density: 0.5\n"
                    "      weight: 0.5\nmerge_method: ties\nbase_model: {E}\nparameters:\n"
                    "  normalize: false\n  int8_mask: true\ndtype: float16\n",
    "ex_gradient_slerp": "slices:\n  - sources:\n      - model: {A}\n        layer_range: [0, 40]"
                         "\n      - model: {B}\n        layer_range: [0, 40]\nmerge_method: "
                         "slerp\nbase_model: {A}\nparameters:\n  t:\n    - filter: self_attn\n"
                         "      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n"
                         "      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n"
                         "dtype: float16\n",
    "ex_linear": "models:\n  - model: {A}\n    parameters:\n      weight: 1.0\n  - model: {C}\n"
                 "    parameters:\n      weight: 0.3\n  - model: {B}\n    parameters:\n"
                 "      weight: 0.5\nmerge_method: linear\ndtype: float16\n",
    "ex_orcamini_platy_44layer": "slices:\n  - sources:\n    - model: {A}\n      layer_range: "
                                 "[0, 24]\n  - sources:\n    - model: {B}\n      layer_range: "
                                 "[20, 40]\nmerge_method: passthrough\ndtype: float16\n",
    "ex_ties": "models:\n  - model: {A}\n    parameters:\n      density: [1, 0.7, 0.1]\n"
               "      weight: 1.0\n  - model: {B}\n    parameters:\n      density: 0.5\n"
               "      weight: [0, 0.3, 0.7, 1]\n  - model: {D}\n    parameters:\n"
               "      density: 0.33\n      weight:\n        - filter: mlp\n          value: 0.5\n"
               "        - value: 0\nmerge_method: ties\nbase_model: {E}\nparameters:\n"
               "  normalize: true\n  int8_mask: true\ndtype: float16\n",
}
CASES = {**SUITE, **EXAMPLES}
#: What recipekit refuses, with the words of its reason (README, import-mergekit section).
REFUSED: dict[str, str] = {}
#: Configs mergekit itself refuses; recipekit must refuse them too.
MERGEKIT_REFUSES = {"della_invalid_epsilon": "Epsilon must be chosen such that density +/- "
                                             "epsilon is in (0, 1)"}
#: Known gaps, each a precise reason.
GAPS: dict[str, str] = {}
#: bf16 cases that do not reproduce mergekit within 1 ULP, each with its reason.
BF16_DIFFERS = {
    "karcher": "mergekit takes karcher's norms in fp32 inside its bf16 computation; recipekit runs "
               "the whole iteration in the compute dtype (up to 0.1 apart)",
    "ramplus_tl": "mergekit's fp32 λ promotes the bf16 computation to fp32 midway and it writes "
                  "the fp32 result; recipekit computes in bf16",
    "arcee_fusion": "mergekit's fp32 mask promotes the bf16 computation to fp32 midway and it "
                    "writes the fp32 result; recipekit computes in bf16",
    "ex_arcee_fusion": "as arcee_fusion",
    "sce": "bf16 variances tie at the select_topk cut: mergekit's topk keeps arbitrary tied "
           "entries, recipekit the lowest flat indices (the tied choice is checked exactly on "
           "the kernel in tests/ops/test_precision.py)",
}
RANDOM = {"dare_ties", "della"}
DATA_MOVING = {"passthrough_scale", "granite_copy", "gpt2_copy", "gpt2_stack",
               "ex_orcamini_platy_44layer"}


def _models(root: Path, dtype: torch.dtype) -> dict[str, str]:
    """The synthetic models, as mergekit's tests/common.py makes them (seeded here)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GraniteConfig,
        GraniteForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    def llama(layers: int) -> LlamaConfig:
        return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                           num_attention_heads=16, num_hidden_layers=layers)

    made = {}
    specs = {**{k: (LlamaForCausalLM, llama(2)) for k in "abc"},
             **{k: (LlamaForCausalLM, llama(40)) for k in "ABCDE"},
             **{k: (GraniteForCausalLM, GraniteConfig(
                 vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                 num_key_value_heads=2, num_hidden_layers=2)) for k in ("ga", "gb")},
             "g2": (GPT2LMHeadModel, GPT2Config(vocab_size=64, n_embd=32, n_layer=12, n_head=2,
                                                n_positions=64))}
    for i, (name, (cls, cfg)) in enumerate(specs.items()):
        torch.manual_seed(100 + i)
        model = cls(cfg)
        with torch.no_grad():  # norms start at 1: make the models differ everywhere
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        path = root / name
        model.to(dtype).save_pretrained(path, safe_serialization=True)
        made[name] = str(path)
    return made


@pytest.fixture(scope="module")
def mergekit_runs(tmp_path_factory) -> dict[str, tuple[Path, Path, str]]:
    """Every case in both variants, run by mergekit in one process: {case id: (config,
    mergekit output, status)}."""
    root = tmp_path_factory.mktemp("mk-suite")
    runs, todo = {}, []
    for variant, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        models = _models(root / f"models-{variant}", dtype)
        for name, text in CASES.items():
            text = text.format(**models)
            if variant == "fp32":
                text = "\n".join(line for line in text.splitlines()
                                 if not line.startswith("dtype:")) + "\ndtype: float32\n"
            cfg = root / variant / f"{name}.yml"
            cfg.parent.mkdir(parents=True, exist_ok=True)
            cfg.write_text(text)
            out = root / variant / f"{name}-mergekit"
            todo.append({"config": str(cfg), "out": str(out)})
            runs[f"{name}-{variant}"] = (cfg, out)
    cases = root / "cases.json"
    cases.write_text(json.dumps(todo))
    env = {"PATH": f"{MERGEKIT_VENV / 'bin'}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "HOME": str(root)}
    subprocess.run([str(MERGEKIT_PYTHON), str(DRIVER), str(cases)], check=True, env=env,
                   capture_output=True, timeout=900)
    status = json.loads((root / "cases.json.status.json").read_text())
    return {k: (cfg, out, status[str(cfg)]) for k, (cfg, out) in runs.items()}


def _params():
    out = []
    for name in CASES:
        for variant in ("fp32", "bf16"):
            marks = ()
            if name in GAPS:
                marks = (pytest.mark.xfail(strict=True, reason=GAPS[name]),)
            elif variant == "bf16" and name in BF16_DIFFERS:
                marks = (pytest.mark.xfail(strict=True, reason=BF16_DIFFERS[name]),)
            out.append(pytest.param(name, variant, marks=marks, id=f"{name}-{variant}"))
    return out


def _compare_random(ours: dict, theirs: dict, base: dict) -> None:
    """Keep-rate and spread of the task vector, over all tensors the merge changes."""
    d_ours = torch.cat([(ours[k].double() - base[k].double()).flatten() for k in theirs])
    d_theirs = torch.cat([(theirs[k].double() - base[k].double()).flatten() for k in theirs])
    keep_ours, keep_theirs = (d_ours != 0).double().mean(), (d_theirs != 0).double().mean()
    assert abs(float(keep_ours - keep_theirs)) < 0.03, (keep_ours, keep_theirs)
    ratio = float(d_ours.std() / d_theirs.std())
    assert 0.85 < ratio < 1.15, ratio


@pytest.mark.parametrize("name, variant", _params())
def test_mergekit_config_reproduced(cli, tmp_path, mergekit_runs, name, variant):
    cfg, mk_out, status = mergekit_runs[f"{name}-{variant}"]
    recipe = tmp_path / "r.yaml"
    result = cli("import-mergekit", cfg, "-o", recipe)
    if name in REFUSED and result.exit_code != 0:
        assert result.exit_code == 2 and REFUSED[name] in result.stderr, result.output
        return
    if name in MERGEKIT_REFUSES:
        assert MERGEKIT_REFUSES[name] in status, status
        assert result.exit_code == 2 or cli("run", recipe, "-q", "--no-fsync", "-o",
                                            tmp_path / "out").exit_code == 2
        return
    assert result.exit_code == 0, result.output
    assert status == "ok", status
    result = cli("run", recipe, "-q", "--no-fsync", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    ours, theirs = read_tensors(tmp_path / "out"), read_tensors(mk_out)
    assert sorted(ours) == sorted(theirs)
    if name in RANDOM:
        _compare_random(ours, theirs, read_tensors(Path(str(cfg.parent).replace(
            f"/{variant}", f"/models-{variant}")) / "c"))
        return
    # TIES/breadcrumbs in bf16/fp16 often tie at the cut-off magnitude: there recipekit keeps
    # the lowest flat indices, mergekit an arbitrary subset (tests/helpers/ties.py)
    bands = {k: b for k, b in plan_bands(compile_recipe(recipe)).items()
             if any(band.any() for band in b)} if variant != "fp32" else {}
    for k in bands:
        assert ours[k].dtype == theirs[k].dtype, k
        assert_equal_outside_band(ours[k], theirs[k], bands[k], what=k)
    bad = [k for k, t in theirs.items() if k not in bands and (
        ours[k].dtype != t.dtype or not torch.equal(ours[k], t))]
    assert not bad, f"{len(bad)} of {len(theirs)} tensors differ, e.g. {bad[:3]}"

"""`extract_lora`: a LoRA adapter from tuned − base.

Oracles: the difference itself (full rank reproduces it within 1e-5), Eckart–Young (at rank k
the Frobenius error equals √Σ of the discarded singular values², which torch's SVD of the
difference gives), and PEFT (the written directory loads and merges to tuned).
"""

from __future__ import annotations

import math

import pytest
import torch

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


def test_lower_rank_error_is_the_discarded_singular_values(cli, tmp_path, pair):
    family, base, tuned = pair
    out = extract(cli, tmp_path, base, tuned, rank=3)
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
        assert abs(torch.linalg.norm(diff - approx).item() - want) <= 1e-5 * max(1, want)
        checked += 1
    assert checked >= 8


def test_sv_epsilon_zeroes_small_components(cli, tmp_path, pair):
    family, base, tuned = pair
    out = extract(cli, tmp_path, base, tuned, rank=8, extra=", sv_epsilon: 1e9")
    assert all(t.abs().max() == 0 for t in read_tensors(out).values())

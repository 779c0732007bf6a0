"""Each op's document check (`Op.check`): every mistake the recipe alone shows fails
`recipekit validate --no-inputs` (the pre-commit hook's check) with exit 2 and the located
message, before any input is resolved.

Oracle: the builders' own messages (the same functions run when a step is built) and the
user's file positions; the models and adapters named here do not exist, so a check that needed
them could not pass or fail this way. Before the checks ran at load time, every case printed
`ok`.
"""

from __future__ import annotations

import pytest

from recipekit.steps import OPS

HEAD = "recipekit: 1\nmodels: {a: ./a, b: ./b, c: ./c}\nadapters: {x: ./x, y: ./y}\nsteps:\n"

#: (case, the step on line 5, the first line of the message after "recipe.yaml:")
CASES = [
    ("slerp without t", "{name: s, op: merge, method: slerp, from: [a, b]}",
     "5:5: steps[0]: method slerp needs `parameters: {t: ...}`"),
    ("ties without base",
     "{name: s, op: merge, method: ties, from: [{model: a, weight: 1}, {model: b, weight: 1}]}",
     "5:5: steps[0]: method ties needs `base:` (the model the others are deltas from)"),
    ("an input without weight",
     "{name: s, op: merge, method: linear, from: [{model: a, weight: 1}, b]}",
     "5:72: steps[0].from[1]: method linear needs a `weight` for each input (`{model: ..., "
     "weight: ...}`, or one value under `parameters`)"),
    ("a pair method with base",
     "{name: s, op: merge, method: nearswap, base: c, from: [a, b], parameters: {t: 0.5}}",
     "5:44: steps[0].base: nearswap takes `from: [A, B]` (t = 0 gives A) and no `base:`"),
    ("the base also in from", "{name: s, op: merge, method: task_arithmetic, base: a, "
     "from: [{model: a, weight: 1}, {model: b, weight: 1}]}",
     "5:57: steps[0].base: 'a' is the base and must not also appear in `from`"),
    ("a misspelled parameter", "{name: s, op: merge, method: task_arithmetic, base: c, "
     "from: [{model: a, weight: 1}], parameters: {lamda: 1}}",
     "5:104: steps[0].parameters.lamda: unknown parameter for method task_arithmetic; did you "
     "mean 'lambda'? parameters: weight, density, lambda, normalize, rescale, int8_mask"),
    ("too few inputs", "{name: s, op: merge, method: model_stock, base: c, from: [a]}",
     "5:62: steps[0].from: method model_stock takes at least 2 model(s) in `from` (besides "
     "the base), got 1"),
    ("a pruning fold without density",
     "{name: s, op: adapters, from: a, adapters: [x, y], combine: ties}",
     "5:5: steps[0]: combine: ties needs `density:` (the fraction of each delta kept)"),
    ("density on a sum", "{name: s, op: combine_adapters, adapters: [x, y], density: 0.5}",
     "5:55: steps[0].density: `density` has no effect with combine: sum; use it with ties, "
     "dare_linear, dare_ties or magnitude_prune"),
    ("a gating row of the wrong length",
     "{name: s, op: adapters, from: a, adapters: [x, y], gating: {layers: [[0.5, 0.5], [1.0]]}}",
     "5:86: steps[0].gating.layers[1]: layer 1's row has 1 weights, but the step folds 2 "
     "adapters; one weight per entry of `adapters:`, in its order"),
    ("top_k with a gating table", "{name: s, op: adapters, from: a, adapters: [x, y], "
     "gating: {modules: {q_proj: [1, 0]}, top_k: 1}}",
     "5:92: steps[0].gating.top_k: `top_k` applies to a scalings log (per token, before "
     "averaging); a table gives the final gates"),
    ("labels and num_labels disagree",
     "{name: s, op: head, from: a, labels: [neg, pos], num_labels: 3}",
     "5:66: steps[0].num_labels: num_labels is 3 but `labels` names 2; drop num_labels: it "
     "follows from labels"),
    ("a head without a class count", "{name: s, op: head, from: a}",
     "5:5: steps[0]: the head op needs the number of classes; add `labels: [...]` or "
     "`num_labels: N`"),
    ("overlapping width groups", "{name: s, op: coalesce, from: a, width: [[0, 1], [1, 2]]}",
     "5:54: steps[0].width[1]: group 1 [1, 2] overlaps group 0 [0, 1]: head 1 is in both; "
     "each head belongs to exactly one group"),
    ("ffn without width", "{name: s, op: coalesce, from: a, depth: [[0, 1]], ffn: [[0, 1]]}",
     "5:60: steps[0].ffn: `ffn:` needs a `width:` scheme; add `width:` or remove `ffn:`"),
    ("overlapping depth groups", "{name: s, op: decoalesce, from: a, depth: [[0, 2], [3, 1, 2]]}",
     "5:56: steps[0].depth[1]: group 1 [3, 1, 2] overlaps group 0 [0, 2]: layer 2 is in both; "
     "each layer belongs to exactly one group"),
]


@pytest.mark.parametrize(("step", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_document_mistake_fails_validate_no_inputs(cli, tmp_path, monkeypatch, step, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(f"{HEAD}  - {step}\n")
    result = cli("validate", "--no-inputs", "recipe.yaml")
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines()[0] == f"recipe.yaml:{message}"
    assert "Traceback" not in result.stderr


def test_every_op_with_document_rules_has_a_check():
    """The ops whose builders refuse document-only mistakes declare a check; the others'
    mistakes are all schema or load-time (layer grammar) ones."""
    assert {name for name, op in OPS.items() if op.check is not None} == {
        "merge", "adapters", "combine_adapters", "head", "coalesce", "decoalesce",
        "interpolate"}  # interpolate: its `tokenizer:` names only its own models


def test_mistakes_are_collected_with_schema_errors(cli, tmp_path, monkeypatch):
    """A step the schema refuses is not op-checked (its keys cannot be trusted); the other
    steps' document mistakes are reported in the same run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(
        f"{HEAD}  - {{name: s, op: merge, method: slerp, from: [a, b]}}\n"
        "  - {name: t, op: merge, method: slerpp, from: [a, b]}\n")
    result = cli("validate", "--no-inputs", "recipe.yaml")
    assert result.exit_code == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("recipe.yaml:")]
    assert [ln.split(": ")[0] for ln in lines] == ["recipe.yaml:5:5", "recipe.yaml:6:34"]
    assert lines[0].endswith("method slerp needs `parameters: {t: ...}`")
    assert result.stderr.endswith("2 errors found; nothing was written.\n")


def test_run_refuses_before_resolving_inputs(cli, tmp_path, monkeypatch):
    """`run` loads the recipe first: the same message, although the models do not exist."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(f"{HEAD}  - {CASES[0][1]}\n")
    result = cli("run", "recipe.yaml")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == f"recipe.yaml:{CASES[0][2]}"

"""steps/merge.py: `op: merge` end to end.

Oracles: the kernels of ops/merge.py applied to the loaded tensors (the wiring: which inputs,
base and per-tensor parameters reach each kernel), properties (a model merged with itself is
itself; a seed reproduces), and — when the side venv exists — mergekit 0.1.5 itself on the same
recipe (tests marked `mergekit`; the kernels' committed goldens cover CI).
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from recipekit.ops.merge import apply_method
from recipekit.ops.rng import tensor_generator

from tests.helpers.builders import make_model, read_tensors
from tests.helpers.recipes import ROOT, write_recipe

MERGEKIT = ROOT / "bench" / ".venv-mergekit" / "bin" / "mergekit-yaml"



@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    d = tmp_path_factory.mktemp("trio")
    return [make_model("llama", d / n, layers=3, seed=s, dtype=torch.float32)
            for n, s in (("base", 0), ("x", 1), ("y", 2))]


def recipe_text(trio, step: str) -> str:
    base, x, y = trio
    return (f"recipekit: 1\nmodels:\n  base: {base}\n  x: {x}\n  y: {y}\nsteps:\n"
            f"  - name: m\n    op: merge\n{step}output: {{path: ./out}}\n")


def run(cli, tmp_path, trio, step: str) -> dict[str, torch.Tensor]:
    r = write_recipe(tmp_path, recipe_text(trio, step))
    result = cli("run", r, "-q")
    assert result.exit_code == 0, result.output
    return read_tensors(tmp_path / "out")


CASES = {
    "linear": ("    method: linear\n    from: [{model: x, weight: 0.3}, {model: y, weight: 0.7}]\n",
               lambda b, x, y: apply_method("linear", [x, y], params={"weight": [0.3, 0.7]})),
    "slerp": ("    method: slerp\n    from: [x, y]\n    parameters: {t: 0.3}\n",
              lambda b, x, y: apply_method("slerp", [y], base=x, params={"t": 0.3})),
    "task_arithmetic": (
        "    method: task_arithmetic\n    base: base\n    from: [{model: x, weight: 0.5}, "
        "{model: y, weight: 0.25}]\n",
        lambda b, x, y: apply_method("task_arithmetic", [x, y], base=b,
                                     params={"weight": [0.5, 0.25]})),
    "ties": ("    method: ties\n    base: base\n    from: [{model: x, weight: 0.6, density: 0.5},"
             " {model: y, weight: 0.4, density: 0.7}]\n",
             lambda b, x, y: apply_method("ties", [x, y], base=b, params={
                 "weight": [0.6, 0.4], "density": [0.5, 0.7]})),
    "nearswap": ("    method: nearswap\n    from: [x, y]\n    parameters: {t: 0.001}\n",
                 lambda b, x, y: apply_method("nearswap", [y], base=x, params={"t": 0.001})),
    "model_stock": ("    method: model_stock\n    base: base\n    from: [x, y]\n",
                    lambda b, x, y: apply_method("model_stock", [x, y], base=b)),
    "ram": ("    method: ram\n    base: base\n    from: [x, y]\n    parameters: {epsilon: 0.01}\n",
            lambda b, x, y: apply_method("ram", [x, y], base=b, params={"epsilon": 0.01})),
}


class TestWiring:
    """Oracle: the method's kernel on the loaded tensors, rounded once to the input dtype."""

    @pytest.mark.parametrize("method", list(CASES))
    def test_each_tensor_is_the_kernel_of_its_inputs(self, cli, tmp_path, trio, method):
        step, kernel = CASES[method]
        out = run(cli, tmp_path, trio, step)
        b, x, y = (read_tensors(p) for p in trio)
        assert out.keys() == b.keys()
        for name, t in out.items():
            want = kernel(b[name], x[name], y[name]).to(torch.float32)
            assert torch.equal(t, want), (method, name)

    def test_gradient_parameter_per_layer(self, cli, tmp_path, trio):
        out = run(cli, tmp_path, trio, "    method: slerp\n    from: [x, y]\n"
                  "    parameters: {t: {gradient: [0, 1]}}\n")
        x, y = read_tensors(trio[1]), read_tensors(trio[2])
        name = "model.layers.1.mlp.up_proj.weight"
        want = apply_method("slerp", [y[name]], base=x[name], params={"t": 0.5})
        assert torch.equal(out[name], want)
        assert torch.equal(out["model.embed_tokens.weight"], apply_method(
            "slerp", [y["model.embed_tokens.weight"]], base=x["model.embed_tokens.weight"],
            params={"t": 0.0}))


class TestProperties:
    def test_model_merged_with_itself_is_itself(self, cli, tmp_path, trio):
        """The same checkpoint under two names (one name twice is refused, below)."""
        r = write_recipe(tmp_path, recipe_text(trio, "    method: linear\n    from: [{model: "
                                                "x, weight: 1}, {model: x2, weight: 3}]\n"
                                                ).replace("\nsteps:", f"\n  x2: {trio[1]}\nsteps:"))
        assert cli("run", r, "-q").exit_code == 0
        out = read_tensors(tmp_path / "out")
        src = read_tensors(trio[1])
        assert all(torch.equal(out[k], src[k]) for k in src)

    def test_random_methods_reproduce_with_a_seed(self, cli, tmp_path, trio):
        step = ("    method: dare_ties\n    base: base\n    from: [{model: x, weight: 1, "
                "density: 0.5}, {model: y, weight: 1, density: 0.5}]\n    seed: SEED\n")

        def merged(sub: str, seed: int) -> dict[str, torch.Tensor]:
            (tmp_path / sub).mkdir()
            return run(cli, tmp_path / sub, trio, step.replace("SEED", str(seed)))

        first, again, other = merged("a", 7), merged("b", 7), merged("c", 8)
        name = "model.layers.0.mlp.up_proj.weight"
        assert all(torch.equal(first[k], again[k]) for k in first)
        assert not torch.equal(first[name], other[name])


class TestComputeDtype:
    """`compute_dtype:` (issue 16 item 4). Oracle: the kernel run as mergekit runs it — inputs
    cast to the compute dtype, computed in it (`ops.precision.native_dtype`), result in it — and
    mergekit itself in tests/tools/test_mergekit_import_methods.py."""

    TIES = ("    method: ties\n    base: base\n    from: [{model: x, weight: 0.6}, "
            "{model: y, weight: 0.4}]\n    parameters: {density: 0.3}\n")

    def test_bfloat16_computes_in_bfloat16(self, cli, tmp_path, trio):
        from recipekit.ops.precision import native_dtype

        out = run(cli, tmp_path, trio, self.TIES + "    compute_dtype: bfloat16\n")
        b, x, y = (read_tensors(p) for p in trio)
        name = "model.layers.1.mlp.down_proj.weight"
        assert out[name].dtype == torch.bfloat16
        bf = [t[name].bfloat16() for t in (b, x, y)]
        with native_dtype():
            expected = apply_method("ties", bf[1:], base=bf[0],
                                    params={"weight": [0.6, 0.4], "density": 0.3})
        assert expected.dtype == torch.bfloat16 and torch.equal(out[name], expected)
        fp32 = apply_method("ties", [x[name], y[name]], base=b[name],
                            params={"weight": [0.6, 0.4], "density": 0.3})
        assert not torch.equal(out[name], fp32.bfloat16())  # bf16 compute selects otherwise

    @pytest.mark.parametrize("method", ["linear", "slerp"])
    def test_the_result_is_rounded_to_the_compute_dtype_before_the_output_dtype(
            self, cli, tmp_path, trio, method):
        """mergekit computes linear and slerp in fp32, rounds to its `dtype:` and only then
        casts to `out_dtype`: with `compute_dtype: bfloat16` and an fp32 output every value is
        a bf16 value. Before, the fp32 result was written as it was (mergekit's imported
        configs with `out_dtype` differed in most values)."""
        from recipekit.ops.precision import native_dtype

        step, kernel = CASES[method]
        r = write_recipe(tmp_path, recipe_text(trio, step + "    compute_dtype: bfloat16\n")
                         .replace("{path: ./out}", "{path: ./out, dtype: float32}"))
        result = cli("run", r, "-q")
        assert result.exit_code == 0, result.output
        out = read_tensors(tmp_path / "out")
        b, x, y = (read_tensors(p) for p in trio)
        for name, t in out.items():
            with native_dtype():
                want = kernel(*(m[name].bfloat16() for m in (b, x, y)))
            assert t.dtype == torch.float32
            assert torch.equal(t, want.bfloat16().float()), name

    def test_arcee_fusion_keeps_the_fp32_result_mergekit_promotes_to(self, cli, tmp_path,
                                                                      trio):
        """mergekit's arcee_fusion leaves bf16 midway (an fp32 mask promotes it) and returns
        fp32 (`graph.nodes.PROMOTED_BY_MERGEKIT`): with an fp32 output its values are that
        result, not rounded to bf16 as linear's and slerp's are."""
        from recipekit.ops.precision import native_dtype

        step = "    method: arcee_fusion\n    from: [x, y]\n    compute_dtype: bfloat16\n"
        r = write_recipe(tmp_path, recipe_text(trio, step)
                         .replace("{path: ./out}", "{path: ./out, dtype: float32}"))
        result = cli("run", r, "-q")
        assert result.exit_code == 0, result.output
        out = read_tensors(tmp_path / "out")
        x, y = read_tensors(trio[1]), read_tensors(trio[2])
        rounded = 0
        for name, t in out.items():
            with native_dtype():
                want = apply_method("arcee_fusion", [y[name].bfloat16()],
                                    base=x[name].bfloat16(),
                                    generator=tensor_generator(0, name))
            assert want.dtype == torch.float32 and torch.equal(t, want), name
            rounded += int((t != t.bfloat16().float()).sum())
        assert rounded > 0  # values no bf16 holds: the result was not rounded to bf16

    def test_absent_and_float32_keep_the_bytes(self, cli, tmp_path, trio):
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        plain = run(cli, tmp_path / "a", trio, self.TIES)
        fp32 = run(cli, tmp_path / "b", trio, self.TIES + "    compute_dtype: float32\n")
        b, x, y = (read_tensors(p) for p in trio)
        for k in plain:
            assert torch.equal(plain[k], fp32[k]), k
            assert torch.equal(plain[k], apply_method(
                "ties", [x[k], y[k]], base=b[k], params={"weight": [0.6, 0.4],
                                                        "density": 0.3})), k

    def test_unknown_dtype_is_refused(self, cli, tmp_path, trio):
        r = write_recipe(tmp_path, recipe_text(trio, self.TIES + "    compute_dtype: fp8\n"))
        result = cli("validate", r)
        assert result.exit_code == 2, result.output
        assert ("steps[0].compute_dtype: unknown value 'fp8'; allowed: float32, bfloat16, "
                "float16, float64, inputs") in result.stderr


class TestContract:
    """Oracle: the method contracts of reference/merge-methods.md §1, as located messages."""

    @pytest.mark.parametrize("where, step", [
        ("from[0].density", "    from: [{model: x, weight: 1, density: [{match: '*mlp*', "
                            "value: 0.9}]}, {model: y, weight: 1, density: 0.5}]\n"),
        ("parameters.density", "    from: [{model: x, weight: 1}, {model: y, weight: 1}]\n"
                               "    parameters: {density: [{match: '*mlp*', value: 0.9}]}\n"),
    ])
    def test_a_rule_list_without_a_default_is_located_at_itself(self, cli, tmp_path, trio,
                                                                 where, step):
        """A rule list that matches no rule for some tensor names the list (which of a step's
        parameters, which input), not just the step."""
        r = write_recipe(tmp_path, recipe_text(
            trio, "    method: ties\n    base: base\n" + step))
        result = cli("run", r, "-q")
        assert result.exit_code == 2, result.output
        assert f"steps[0].{where}: no rule matches `" in result.stderr

    def test_a_zero_weight_sum_is_refused_unless_not_normalized(self, cli, tmp_path, trio):
        """Σw = 0 with normalize divides by 0 (NaN/Inf everywhere, as mergekit writes);
        without normalize it is a plain difference. Oracle: x − y."""
        step = "    method: linear\n    from: [{model: x, weight: 1}, {model: y, weight: -1}]\n"
        r = write_recipe(tmp_path, recipe_text(trio, step))
        result = cli("validate", r)
        assert result.exit_code == 2
        assert "sum to 0 and `normalize` is on" in result.stderr
        out = run(cli, tmp_path, trio, step + "    parameters: {normalize: false}\n")
        x, y = read_tensors(trio[1]), read_tensors(trio[2])
        for k, t in out.items():
            want = (x[k].float() - y[k].float()).to(t.dtype)
            assert torch.equal(t, want), k

    @pytest.mark.parametrize("step, message", [
        ("    method: ties\n    from: [{model: x, weight: 1}]\n",
         "steps[0]: method ties needs `base:` (the model the others are deltas from)"),
        ("    method: ties\n    base: base\n    from: [base, {model: x, weight: 1}]\n",
         "steps[0].base: 'base' is the base and must not also appear in `from`"),
        ("    method: slerp\n    base: base\n    from: [x, y]\n    parameters: {t: 0.5}\n",
         "steps[0].base: slerp takes `from: [A, B]` (t = 0 gives A) and no `base:`"),
        ("    method: linear\n    from: [x, {model: y, weight: 1}]\n",
         "steps[0].from[0]: method linear needs a `weight` for each input"),
        ("    method: linear\n    base: base\n    from: [x]\n    parameters: {weight: 1}\n",
         "steps[0].base: method linear takes no base; list every model under `from`"),
        ("    method: slerp\n    from: [x, y]\n",
         "steps[0]: method slerp needs `parameters: {t: ...}`"),
        ("    method: ties\n    base: base\n    from: [x]\n    parameters: {weight: 1, "
         "lamda: 2}\n",
         "steps[0].parameters.lamda: unknown parameter for method ties; did you mean 'lambda'?"),
        ("    method: ties\n    base: base\n    from: [x]\n    parameters: {weight: 1, "
         "normalize: 1}\n",
         "steps[0].parameters.normalize: expected a boolean, got 1"),
        ("    method: ties\n    base: base\n    from: [{model: x, weight: 0.5}, {model: x, "
         "weight: 0.5}]\n    parameters: {density: 0.5}\n",
         "steps[0].from[1]: 'x' is already listed in `from`; list each model once"),
        ("    method: linear\n    from: [{model: x, weight: 1}, {model: y, weight: -1}]\n",
         "steps[0]: the weights of `"),  # ... sum to 0 and `normalize` is on
        ("    method: model_stock\n    base: base\n    from: [x]\n",
         "steps[0].from: method model_stock takes at least 2 model(s) in `from` (besides the "
         "base), got 1"),
    ])
    def test_located_errors(self, cli, tmp_path, trio, step, message):
        r = write_recipe(tmp_path, recipe_text(trio, step))
        result = cli("validate", r)
        assert result.exit_code == 2, result.output
        assert message in result.stderr, result.stderr


class TestSharesOutsideZeroOne:
    """A density or select_topk outside [0, 1] behaves as mergekit reads it (above 1: keep
    everything, below 0: keep nothing), but is most likely a slip (``density: 15`` meant as
    15%): `validate` says so once per parameter, and the output is 1's or 0's."""

    @pytest.mark.parametrize("step, same_as, warning", [
        ("    method: ties\n    base: base\n    from: [{model: x, weight: 0.6, density: 15},"
         " {model: y, weight: 0.4, density: 0.5}]\n",
         "    method: ties\n    base: base\n    from: [{model: x, weight: 0.6, density: 1},"
         " {model: y, weight: 0.4, density: 0.5}]\n",
         "step 'm': density 15 (tensor `"),
        ("    method: sce\n    base: base\n    from: [x, y]\n    parameters: {select_topk: 1.5}\n",
         "    method: sce\n    base: base\n    from: [x, y]\n",
         "step 'm': select_topk 1.5 (tensor `"),
        ("    method: ties\n    base: base\n    from: [x, y]\n    parameters: {weight: 1, "
         "density: -0.2}\n",
         "    method: ties\n    base: base\n    from: [x, y]\n    parameters: {weight: 1, "
         "density: 0}\n",
         "step 'm': density -0.2 (tensor `"),
    ])
    def test_warned_once_and_read_as_mergekit_does(self, cli, tmp_path, trio, step, same_as,
                                                   warning):
        r = write_recipe(tmp_path, recipe_text(trio, step))
        result = cli("validate", r)
        assert result.exit_code == 0, result.output
        assert result.stderr.count("warning: ") == 1 and warning in result.stderr, \
            result.stderr
        assert "a share is a number in [0, 1], e.g. 0.15 for 15%" in result.stderr
        assert ("below 0" if "-" in warning else "above 1") in result.stderr
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        got = run(cli, tmp_path / "a", trio, step)
        want = run(cli, tmp_path / "b", trio, same_as)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got)

    def test_shares_inside_say_nothing(self, cli, tmp_path, trio):
        r = write_recipe(tmp_path, recipe_text(trio, CASES["ties"][0]))
        result = cli("validate", r)
        assert result.exit_code == 0 and "warning" not in result.stderr, result.stderr


def test_parameter_rules_that_match_no_tensor_are_named_in_a_warning(cli, tmp_path, trio):
    """A rule of a method-wide or a per-input parameter that matches no merged tensor never
    applies (mergekit's substring filter `self_attn` written as a glob): `validate` warns,
    located at the rule; a rule that matches says nothing."""
    step = ("    method: ties\n    base: base\n    from:\n"
            "      - {model: x, weight: [{match: self_attn, value: 1}, {value: 0.5}]}\n"
            "      - {model: y, weight: 0.5}\n"
            "    parameters: {density: [{match: '*mlp*', value: 0.3}, {match: '*.lm_head*', "
            "value: 0.9}, {value: 0.7}]}\n")
    r = write_recipe(tmp_path, recipe_text(trio, step))
    result = cli("validate", r)
    assert result.exit_code == 0, result.output
    assert [line for line in result.stderr.splitlines() if "matches no tensor" in line] == [
        f"warning: {r}:14:58: steps[0].parameters.density[1]: rule `match: *.lm_head*` "
        "matches no tensor of step 'm', so it never applies; `match` is a glob on the full "
        "tensor name; `recipekit inspect --headers-only -v MODEL` lists the names",
        f"warning: {r}:12:29: steps[0].from[0].weight[0]: rule `match: self_attn` matches no "
        "tensor of step 'm', so it never applies; `match` is a glob on the full tensor name "
        "(mergekit's `filter` is a substring): write `*self_attn*` for the names that contain "
        "`self_attn`"], result.stderr


@pytest.mark.mergekit
@pytest.mark.skipif(not MERGEKIT.exists(), reason="no side venv: bash bench/setup_mergekit.sh")
@pytest.mark.parametrize("method", ["linear", "ties", "task_arithmetic", "slerp"])
def test_same_output_as_mergekit(cli, tmp_path, trio, method):
    """Oracle: mergekit 0.1.5 on the same fp32 models (`dtype: float32`), within 1e-6."""
    base, x, y = trio
    configs = {
        "linear": f"models:\n  - model: {x}\n    parameters: {{weight: 0.3}}\n"
                  f"  - model: {y}\n    parameters: {{weight: 0.7}}\nmerge_method: linear\n",
        "ties": f"base_model: {base}\nmodels:\n  - model: {x}\n    parameters: {{weight: 0.6, "
                f"density: 0.5}}\n  - model: {y}\n    parameters: {{weight: 0.4, density: 0.7}}\n"
                "merge_method: ties\n",
        "task_arithmetic": f"base_model: {base}\nmodels:\n  - model: {x}\n    parameters: "
                           f"{{weight: 0.5}}\n  - model: {y}\n    parameters: {{weight: 0.25}}\n"
                           "merge_method: task_arithmetic\n",
        "slerp": f"base_model: {x}\nmodels:\n  - model: {x}\n  - model: {y}\n"
                 "merge_method: slerp\nparameters: {t: 0.3}\n",
    }
    cfg = tmp_path / "mk.yml"
    cfg.write_text(configs[method] + "dtype: float32\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run([str(MERGEKIT), str(cfg), str(tmp_path / "mk")], check=True, env=env,
                   capture_output=True)
    ours = run(cli, tmp_path, trio, CASES[method][0])
    theirs = read_tensors(tmp_path / "mk")
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=0), (method, k)


@pytest.mark.mergekit
@pytest.mark.skipif(not MERGEKIT.exists(), reason="no side venv: bash bench/setup_mergekit.sh")
def test_gradients_and_filters_match_mergekit_with_explicit_rules(cli, tmp_path, trio):
    """Oracle: mergekit 0.1.5. Its gradients use t = 0 for the tensors after the layers (final
    norm, lm_head) and its filters are substrings; explicit rules reproduce both exactly, so the
    semantics differ only where README documents it."""
    _, x, y = trio
    cfg = tmp_path / "mk.yml"
    cfg.write_text(
        f"base_model: {x}\nmodels:\n  - model: {x}\n  - model: {y}\nmerge_method: slerp\n"
        "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 1]\n"
        "    - filter: mlp\n      value: [1, 0]\n    - value: [0.2, 0.8]\ndtype: float32\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run([str(MERGEKIT), str(cfg), str(tmp_path / "mk")], check=True, env=env,
                   capture_output=True)
    ours = run(cli, tmp_path, trio, (
        "    method: slerp\n    from: [x, y]\n    parameters:\n      t:\n"
        '        - {match: "*self_attn*", value: {gradient: [0, 0.5, 1]}}\n'
        '        - {match: "*mlp*", value: {gradient: [1, 0]}}\n'
        "        - {match: model.norm.weight, value: 0.2}\n"   # mergekit: t = 0 after layers
        "        - {match: lm_head.weight, value: 0.2}\n"
        "        - {value: {gradient: [0.2, 0.8]}}\n"))
    theirs = read_tensors(tmp_path / "mk")
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=0), k
    # Without the two explicit rules, model.norm and lm_head would take t = 1 (0.8) here.

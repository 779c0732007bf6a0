"""X-LoRA gating of the `adapters` op against PEFT 0.21's XLoraModel itself.

Oracles: (1) with constant gates (classifier weight zeroed, random bias: every token gets
softmax(bias/T) per module) PEFT's X-LoRA forward equals the static fold, logits within 1e-5,
for each table form; (2) a scalings log taken from PEFT's `get_scalings_log()` and written in
the original xlora package's `flush_log_scalings` layout (one .npy, or per-batch-size files plus
the mapping JSON) yields gates equal to the log's per-module means and folded tensors equal to
W + Σ_i ḡ[l, i]·s_i B_i A_i computed from PEFT's own LoRA modules; (3) X-LoRA's module order is
PEFT's LoraLayer order in `named_modules`, which is not sorted key order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.adapter_builders import make_adapter
from tests.helpers.builders import FAMILIES, load_model, make_model, read_tensors
from tests.helpers.recipes import write_recipe

IDS = torch.arange(24).reshape(2, 12) % 100
HIDDEN = 32
#: Expert 0 wraps q/v/gate, expert 1 q/down: the union interleaves attention and MLP modules.
EXPERTS = [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]),
           dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "down_proj"])]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_model("llama", tmp_path_factory.mktemp("xlora") / "base", layers=2, seed=3)


@pytest.fixture(scope="module")
def experts(base, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("experts")
    return [make_adapter("llama", base, root / f"e{i}", seed=10 + i, **kw)
            for i, kw in enumerate(EXPERTS)]


def xlora_model(base: Path, experts: list[Path], **config):
    """PEFT's X-LoRA model over ``experts`` (names "0".."n-1", as PEFT 0.21 requires)."""
    import peft

    model = load_model("llama", base)
    model.config.use_cache = False  # XLoraModel refuses a model that caches
    cfg = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=HIDDEN, xlora_depth=1,
                           layerwise_scalings=True,
                           adapters={str(i): str(p) for i, p in enumerate(experts)}, **config)
    xm = peft.get_peft_model(model, cfg).eval()
    return xm


def wrapped_modules(xm) -> list[str]:
    """PEFT's LoRA-wrapped modules in X-LoRA's numbering order, as checkpoint module names."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.lora_model.model."
    return [n[len(prefix):] for n, m in xm.named_modules() if isinstance(m, LoraLayer)]


def constant_gates(xm, bias: torch.Tensor) -> torch.Tensor:
    """Zero the classifier weight and set its bias: every token's gates are softmax(bias/T)."""
    last = xm.base_model.internal_xlora_classifier.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(bias.reshape(-1))
        xm(input_ids=IDS)
    gates = xm.get_latest_scalings()
    assert torch.allclose(gates, gates[:1, :1].expand_as(gates))  # constant over tokens
    return gates[0, 0].detach().clone()


def fold(cli, tmp_path: Path, base: Path, experts: list[Path], gating: str,
         weights: tuple[float, ...] = (1.0, 1.0), expect: int = 0) -> Path:
    names = ", ".join(f"e{i}: {p}" for i, p in enumerate(experts))
    uses = ", ".join(f"{{use: e{i}, weight: {w}}}" for i, w in enumerate(weights))
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{base: {base}}}
        adapters: {{{names}}}
        steps:
          - name: folded
            op: adapters
            from: base
            adapters: [{uses}]
            gating:
        """.rstrip(" ") + "".join(f"              {line}\n" for line in gating.strip().splitlines())
        + "        output: {path: ./out}\n")
    result = cli("run", recipe, "-q")
    assert result.exit_code == expect, result.output
    return tmp_path / "out" if expect == 0 else result.output


def logits_of(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_model("llama", path).eval()(input_ids=IDS).logits


def test_module_order_is_registration_order(base, experts):
    """X-LoRA numbers LoRA modules in `modules()` order: attention before MLP in each layer,
    the union of both experts' targets; sorted key order would put mlp.* first."""
    xm = xlora_model(base, experts)
    order = wrapped_modules(xm)
    assert order == [f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj")]
    assert order != sorted(order)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("vit", "deit")])
def test_architecture_order_matches_named_modules(family, tmp_path):
    """The architecture data orders every Linear / Embedding / Conv1D weight of a family as
    transformers registers the modules (ViT/DeiT: transformers 5 renames their modules in
    memory, so PEFT module names are not checkpoint names there)."""
    from recipekit.inputs.resolve import resolve_sources
    from recipekit.plan import model_from_checkpoint
    from recipekit.recipe import load_recipe
    from recipekit.steps.gating import xlora_order

    path = make_model(family, tmp_path / family, layers=2)
    model = load_model(family, path)
    names = [f"{n}.weight" for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear | torch.nn.Embedding)
             or type(m).__name__ == "Conv1D"]
    recipe = load_recipe(write_recipe(tmp_path, f"recipekit: 1\nmodels: {{m: {path}}}\n"
                                                  "output: {model: m}\n"))
    vm = model_from_checkpoint(resolve_sources(recipe)["m"])
    on_disk = [n for n in names if n in vm.tensors]  # tied heads are not stored
    ordered, unplaced = xlora_order(vm, sorted(on_disk))
    assert unplaced == [] and ordered == on_disk


def test_constant_gates_module_table_equals_xlora_forward(cli, tmp_path, base, experts):
    """{module: row} table = the constant gates; also set_scale (weight) and
    global_scaling_weight, against PEFT's X-LoRA forward."""
    from peft.tuners.lora import LoraLayer

    xm = xlora_model(base, experts, softmax_temperature=0.7)
    torch.manual_seed(0)
    gates = constant_gates(xm, torch.randn(8, 2) * 2)
    xm.set_global_scaling_weight(0.8)
    for m in xm.modules():
        if isinstance(m, LoraLayer) and "1" in m.scaling:
            m.set_scale("1", -0.6)
    with torch.no_grad():
        expected = xm(input_ids=IDS).logits
    table = "\n".join(f"  {name}: {row}" for name, row in
                      zip(wrapped_modules(xm), gates.tolist(), strict=True))
    out = fold(cli, tmp_path, base, experts, f"global_scaling_weight: 0.8\nmodules:\n{table}",
               weights=(1.0, -0.6))
    got = logits_of(out)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (logits_of(base) - expected).abs().max().item() > 1e-2  # the experts matter
    manifest = json.loads((out / "recipekit.json").read_text())
    meta = manifest["operators"]["folded"]["gating"]
    assert meta["log"] is None and meta["modules"] == wrapped_modules(xm)
    assert np.allclose(meta["gates"], gates.numpy())


def test_constant_gates_row_list_and_layer_shorthand(cli, tmp_path, base, experts):
    """The list form (rows in X-LoRA order) and the per-layer shorthand (modules of a layer
    share the bias, so their gates agree), each against the X-LoRA forward."""
    xm = xlora_model(base, experts)
    per_layer = torch.tensor([[1.5, -0.5], [-1.0, 0.7]])
    gates = constant_gates(xm, per_layer.repeat_interleave(4, dim=0))
    with torch.no_grad():
        expected = xm(input_ids=IDS).logits
    rows = "\n".join(f"  - {row}" for row in gates.tolist())
    (tmp_path / "list").mkdir()
    got = logits_of(fold(cli, tmp_path / "list", base, experts, f"modules:\n{rows}"))
    assert (got - expected).abs().max().item() <= 1e-5
    layer_rows = [gates[0].tolist(), gates[4].tolist()]
    (tmp_path / "layers").mkdir()
    got = logits_of(fold(cli, tmp_path / "layers", base, experts, f"layers: {layer_rows}"))
    assert (got - expected).abs().max().item() <= 1e-5


def flush_log_scalings(log: list[torch.Tensor], path: str) -> None:
    """The original xlora package's `flush_log_scalings` (EricLBuehler/xlora, 8217992): bucket
    the entries by ``shape[0]`` (the batch size), numpy.save each bucket, plus a mapping JSON
    when there is more than one bucket."""
    buckets: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
    for i, scaling in enumerate(log):
        buckets.setdefault(scaling.shape[0], ([], []))
        buckets[scaling.shape[0]][0].append(i)
        buckets[scaling.shape[0]][1].append(scaling)
    if len(buckets) == 1:
        np.save(path, torch.cat([s.unsqueeze(0) for s in log]).numpy())
        return
    mapping = {}
    for key, (indices, scalings) in buckets.items():
        mapping[f"{path}-{key}.npy"] = indices
        np.save(f"{path}-{key}", torch.cat([s.unsqueeze(0) for s in scalings]).numpy())
    Path(f"{path}-mapping.json").write_text(json.dumps(mapping))


def logged_model(base: Path, experts: list[Path], shapes: list[tuple[int, int]]):
    """X-LoRA with a random (token-dependent) classifier, its scalings log over inputs of
    ``shapes`` (batch, seq)."""
    xm = xlora_model(base, experts)
    torch.manual_seed(1)
    last = xm.base_model.internal_xlora_classifier.layers[-1]
    with torch.no_grad():
        last.weight.normal_(0, 2.0)
        xm.enable_scalings_logging()
        for b, s in shapes:
            xm(input_ids=torch.randint(0, 128, (b, s)))
    log = [t.detach().clone() for t in xm.get_scalings_log()]
    assert len(log) == len(shapes)
    return xm, log


def expected_fold(xm, base: Path, means: torch.Tensor) -> dict[str, torch.Tensor]:
    """W + Σ_i ḡ[l, i]·s_i·B_i A_i from PEFT's own LoRA modules (fp64)."""
    from peft.tuners.lora import LoraLayer

    out = {k: v.double() for k, v in read_tensors(base).items()}
    layers = [m for m in xm.modules() if isinstance(m, LoraLayer)]
    for index, (name, module) in enumerate(zip(wrapped_modules(xm), layers, strict=True)):
        for key in module.lora_A:
            a, b = module.lora_A[key].weight.double(), module.lora_B[key].weight.double()
            out[f"{name}.weight"] += means[index, int(key)].item() * module.scaling[key] * (b @ a)
    return out


@pytest.mark.parametrize("layout", ["single", "mapping"])
def test_log_yields_the_per_module_means(cli, tmp_path, base, experts, layout):
    shapes = [(2, 10), (2, 10), (2, 10)] if layout == "single" else [(2, 10), (3, 7), (2, 10)]
    xm, log = logged_model(base, experts, shapes)
    (tmp_path / "logs").mkdir()
    flush_log_scalings(log, str(tmp_path / "logs" / "scalings"))
    written = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert written == (["scalings.npy"] if layout == "single" else
                       ["scalings-2.npy", "scalings-3.npy", "scalings-mapping.json"])
    tokens = torch.cat([t.double().reshape(-1, 8, 2) for t in log])
    means = tokens.mean(dim=0)
    assert (means - means[:1]).abs().max() > 1e-3  # gates differ by module
    out = fold(cli, tmp_path, base, experts, "log: logs/scalings")
    meta = json.loads((out / "recipekit.json").read_text())["operators"]["folded"]["gating"]
    assert meta["log"] == "logs/scalings" and meta["tokens"] == tokens.shape[0]
    assert set(meta["files"]) == set(written) and all(len(h) == 64
                                                       for h in meta["files"].values())
    assert np.abs(np.array(meta["gates"]) - means.numpy()).max() <= 1e-12
    ours, ref = read_tensors(out), expected_fold(xm, base, means)
    for name, tensor in ours.items():
        assert (tensor.double() - ref[name]).abs().max().item() <= 1e-6, name
    changed = {n for n in ours if not torch.equal(ours[n], read_tensors(base)[n])}
    assert changed == {f"{m}.weight" for m in wrapped_modules(xm)}


def test_log_top_k_matches_peft_transform(cli, tmp_path, base, experts):
    """top_k / softmax_topk are applied per token before averaging, as X-LoRA's forward does
    (PEFT's `get_maybe_topk_scalings` on the logged gates is the oracle)."""
    from peft.tuners.xlora.layer import XLoraLayer

    xm, log = logged_model(base, experts, [(2, 10)])
    flush_log_scalings(log, str(tmp_path / "s"))
    cfg = xm.base_model.xlora_config
    cfg.top_k_lora, cfg.enable_softmax_topk = 1, True
    layer = XLoraLayer(xm, None, None, 0, cfg)
    means = []
    for index in range(8):
        layer.layer_number = index
        means.append(layer.get_maybe_topk_scalings(log[0]).double().reshape(-1, 2).mean(0))
    out = fold(cli, tmp_path, base, experts, "log: s.npy\ntop_k: 1\nsoftmax_topk: true")
    meta = json.loads((out / "recipekit.json").read_text())["operators"]["folded"]["gating"]
    assert np.abs(np.array(meta["gates"]) - torch.stack(means).numpy()).max() <= 1e-12


def test_gating_refusals_are_located(cli, tmp_path, base, experts, tmp_path_factory):
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
               "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"]
    cases = {
        "row length": ("modules: {model.layers.0.self_attn.q_proj: [1, 0, 0]}",
                       "recipe.yaml:10:", "has 3 weights, but the step folds 2 adapters"),
        "unknown": ("layers: [[1, 0], [0, 1]]\nmodules: {model.layers.0.mlp.up_proj: [1, 0]}",
                    "recipe.yaml:11:", "no adapter of this step wraps module "
                    "`model.layers.0.mlp.up_proj`"),
        "count": ("modules: [[1, 0], [0, 1]]", "recipe.yaml:10:",
                  "gating.modules has 2 rows, but the adapters wrap 8 modules"),
        "layers": ("layers: [[1, 0]]", "recipe.yaml:10:", "gating.layers has 1 rows, but model "
                   "'base' has 2 layers"),
        # one module under two spellings: the last row silently won (a black-box finding)
        "twice": ("layers: [[1, 0], [0, 1]]\nmodules: {model.layers.1.mlp.down_proj.weight: "
                  "[1, 0],\n  model.layers.1.mlp.down_proj: [0, 1]}", "recipe.yaml:12:9:",
                  "steps[0].gating.modules.model.layers.1.mlp.down_proj: module "
                  "`model.layers.1.mlp.down_proj` is also given as "
                  "`model.layers.1.mlp.down_proj.weight`: two rows for one module; keep one"),
        "missing": ("modules: {" + ", ".join(f"{m}: [1, 0]" for m in modules) + "}",
                    "recipe.yaml:9:", "gating gives no weights for 4 LoRA-wrapped module(s)"),
        "both": ("layers: [[1, 0], [0, 1]]\nlog: x.npy", "recipe.yaml:9:", "not both"),
        "top_k table": ("layers: [[1, 0], [0, 1]]\ntop_k: 1", "recipe.yaml:11:",
                        "`top_k` applies to a scalings log"),
        "no log": ("log: nowhere/scalings", "recipe.yaml:10:",
                   "no scalings log scalings.npy or scalings-mapping.json"),
    }
    for key, (gating, where, message) in cases.items():
        d = tmp_path_factory.mktemp("refusal")
        out = fold(cli, d, base, experts, gating, expect=2)
        assert where in out and message in out, (key, out)


def test_bad_logs_are_located(cli, tmp_path, base, experts):
    cases = {
        "shape": (lambda p: np.save(p, np.full((1, 2, 3, 8), 0.5, np.float32)),
                  "has shape [1, 2, 3, 8], expected 5 axes"),
        "counts": (lambda p: np.save(p, np.full((1, 1, 3, 7, 2), 0.5, np.float32)),
                   "the log gates 7 modules × 2 adapters, but this step folds 2 adapters "
                   "that wrap 8 modules"),
        "pickle": (lambda p: np.save(p, np.array([{"a": 1}], dtype=object)),
                   "is not a numpy .npy array"),
        "ints": (lambda p: np.save(p, np.ones((1, 1, 1, 8, 2), np.int64)),
                 "holds int64 values, not floating-point gates"),
        "nan": (lambda p: np.save(p, np.full((1, 1, 1, 8, 2), np.nan, np.float32)),
                "not finite"),
        "not npy": (lambda p: Path(p).write_text("hello"), "is not a numpy .npy array"),
    }
    for key, (write, message) in cases.items():
        d = tmp_path / key.replace(" ", "_")
        d.mkdir()
        write(str(d / "s.npy"))
        out = fold(cli, d, base, experts, "log: s.npy", expect=2)
        assert "recipe.yaml:10:" in out and "steps[0].gating.log: " in out, (key, out)
        assert message in out, (key, out)
    d = tmp_path / "mapping"
    d.mkdir()
    np.save(d / "s-2.npy", np.full((2, 2, 3, 8, 2), 0.5, np.float32))
    (d / "s-mapping.json").write_text(json.dumps({"/elsewhere/s-2.npy": [0, 2]}))
    out = fold(cli, d, base, experts, "log: s", expect=2)
    assert "do not number the log entries 0..1 once each" in out, out
    (d / "s-mapping.json").write_text(json.dumps({"s-2.npy": [0], "s-3.npy": [1]}))
    out = fold(cli, d, base, experts, "log: s-mapping.json", expect=2)
    assert "lists 1 log positions for s-2.npy, which holds 2 entries" in out, out


def test_dora_and_pruning_are_refused(cli, tmp_path, base, experts, tmp_path_factory):
    dora = make_adapter("llama", base, tmp_path_factory.mktemp("dora") / "d", seed=5, r=2,
                        lora_alpha=4, use_dora=True, target_modules=["q_proj"])
    out = fold(cli, tmp_path, base, [experts[0], dora], "layers: [[1, 0], [0, 1]]", expect=2)
    assert "recipe.yaml:8:" in out and "'e1' is a DoRA adapter, which X-LoRA gating cannot " \
        "fold" in out, out
    # each refusal gives its own reason: a modules_to_save expert was told "(PEFT's
    # XLoraModel refuses DoRA)" (a black-box finding)
    saved = make_adapter("llama", base, tmp_path_factory.mktemp("mts") / "m", seed=6, r=2,
                         target_modules=["q_proj"], modules_to_save=["lm_head"])
    out = fold(cli, tmp_path_factory.mktemp("refused"), base, [experts[0], saved],
               "layers: [[1, 0], [0, 1]]", expect=2)
    assert ("'e1' replaces tensors whole (modules_to_save, trained biases, a saved base layer "
            "unlike the model's), which X-LoRA gating cannot fold; X-LoRA gates each expert's "
            "low-rank update B·A, and a tensor saved whole is not part of it: fold this adapter "
            "in an `op: adapters` step without `gating:`") in " ".join(out.split()), out
    assert "DoRA" not in out, out
    result = cli("run", write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{base: {base}}}
        adapters: {{e0: {experts[0]}, e1: {experts[1]}}}
        steps:
          - name: f
            op: adapters
            from: base
            adapters: [e0, e1]
            combine: ties
            density: 0.5
            gating: {{layers: [[1, 0], [0, 1]]}}
        """), "-q")
    assert result.exit_code == 2 and "recipe.yaml:9:" in result.output
    assert "gating sums the gated deltas; combine: ties does not apply" in result.output

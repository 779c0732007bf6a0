"""steps/moe_gates.py: MoE routers from prompts, against mergekit-moe 0.1.5's `get_gate_params`."""

from __future__ import annotations

import json
import os
import subprocess
import weakref
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers as tf
from tokenizers import AddedToken, Tokenizer, models

from recipekit.errors import RecipeError
from recipekit.inputs.resolve import resolve_sources
from recipekit.inputs.tokenizer_file import KEY, resolve_tokenizer
from recipekit.io.reader import FileReader
from recipekit.plan.compile import model_from_checkpoint
from recipekit.recipe import Step, load_recipe
from recipekit.run import execute
from recipekit.steps.moe_gates import CheapEmbedGates, ExpertPrompts, HiddenGates, prompt_gate_nodes

from tests.helpers.mergekit import MERGEKIT_PYTHON, needs_mergekit
from tests.helpers.recipes import ROOT, write_recipe

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:()=_'"
MERGES = [("d", "e"), ("de", "f"), (" ", "t"), ("t", "h"), (" ", "a"), ("i", "n"), ("o", "n"),
          ("e", "r")]
SMALL = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, num_hidden_layers=3, max_position_embeddings=128,
             tie_word_embeddings=False)
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(rope_theta=5000.0)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=6)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(rope_theta=30000.0)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {}),
}
#: Expert A: two code prompts; expert B: two story prompts and a negative (reference/moe.md §5).
PROMPTS = [ExpertPrompts(("def f(x):", "import os")),
           ExpertPrompts(("Once upon a time", "the end."), ("def g(): return 1",))]


def make_tokenizer(directory: Path, *, bos: bool = True) -> int:
    """A BPE over single characters plus a few merges, with <unk>, <s>, </s> (as mergekit's
    tests build one); saved with transformers so that its config names BOS and EOS."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<unk>"))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                                      **({"bos_token": "<s>"} if bos else {}))
    fast.save_pretrained(directory)
    return len(vocab)


def make_base(directory: Path, family: str, *, bos: bool = True, **overrides: Any) -> Path:
    """A tiny random ``family`` model (fp32, GQA, perturbed norms and biases) with a tokenizer."""
    config_cls, model_cls, extra = FAMILIES[family]
    directory.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(directory, bos=bos)
    torch.manual_seed(3)
    model = model_cls(config_cls(**SMALL, **extra, vocab_size=vocab, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)
    # transformers 5 rebuilds some families' tokenizer pipeline from the model type (Qwen2's
    # byte-level split); saving what it loaded makes tokenizer.json the pipeline it runs, as a
    # real checkpoint's is
    tf.AutoTokenizer.from_pretrained(directory).save_pretrained(directory)
    return directory


def gate_nodes(tmp_path: Path, base: Path, prompts: list[ExpertPrompts], mode: str,
               spec: dict[str, Any] | None = None) -> tuple[list[Any], Any]:
    """`prompt_gate_nodes` for a step ``moe`` over model input ``base`` (a recipe whose step
    0 stands in for `op: moe`, which another branch builds), and the resolved sources."""
    recipe = load_recipe(write_recipe(tmp_path, f"""
        recipekit: 1
        models:
          base: {base}
        steps:
          - name: gates
            op: layers
            from: base
            layers: ["range(0,3)"]
        """))
    sources = resolve_sources(recipe)
    step = Step("gates", "moe", spec or {"base": "base"}, 0)
    side = resolve_tokenizer(recipe, step, sources)
    step = replace(step, files={KEY: side} if side is not None else {})
    nodes = prompt_gate_nodes(step, recipe, model_from_checkpoint(sources["base"]), prompts, mode)
    return nodes, sources


def evaluate_from_files(nodes: list[Any], sources: Any) -> torch.Tensor:
    """The nodes' values as the executor computes them, reading the files (run/execute.py),
    one runtime for all layers: the sweep is computed once and shared (as `open_runtime`
    keeps the values several output tensors read, `plan.cost.shared_values`)."""
    from recipekit.plan.cost import shared_values

    plan = SimpleNamespace(sources=sources)
    with FileReader() as reader:
        rt = execute.Runtime(reader, torch.device("cpu"), None, None,  # type: ignore[arg-type]
                             keep=shared_values(nodes))
        return torch.stack([execute.evaluate(n, plan, rt) for n in nodes])  # type: ignore[arg-type]


def mergekit_gates(tmp_path: Path, base: Path, prompts: list[ExpertPrompts], mode: str,
                   dtype: str = "float32") -> torch.Tensor:
    """mergekit-moe 0.1.5's router weights (layers, experts, hidden), from its side venv."""
    experts = tmp_path / "experts.json"
    experts.write_text(json.dumps([[list(p.positive), list(p.negative)] for p in prompts]))
    out = tmp_path / f"mk-{mode}-{dtype}.pt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(MERGEKIT_PYTHON), "-I", str(ROOT / "tests" / "helpers" /
                                                     "mergekit_moe_gates.py"),
                           str(base), str(experts), mode, str(out), dtype],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gate-bases")
    return {f: make_base(root / f, f) for f in FAMILIES}


@needs_mergekit
@pytest.mark.mergekit
class TestMatchesMergekit:
    """Oracle: mergekit-moe 0.1.5's `get_gate_params` on the same base, tokenizer and prompts
    (for the hidden modes with the base loaded in fp32; mergekit's own bf16 is compared
    within bf16 rounding), within 1e-5 in fp32."""

    @pytest.mark.parametrize("family", list(FAMILIES))
    @pytest.mark.parametrize("mode", ["cheap_embed", "hidden", "hidden_avg"])
    def test_router_weights(self, tmp_path, bases, family, mode):
        if mode == "cheap_embed" and family != "llama":
            pytest.skip("cheap_embed reads the embedding table only: one family suffices")
        nodes, sources = gate_nodes(tmp_path, bases[family], PROMPTS, mode)
        got = evaluate_from_files(nodes, sources)
        want = mergekit_gates(tmp_path, bases[family], PROMPTS, mode)
        assert got.shape == want.shape == (3, 2, 32)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    def test_mergekit_bf16_is_within_its_rounding(self, tmp_path, bases):
        """mergekit computes `hidden` in bf16: ours (fp32) is the same routers up to that."""
        nodes, sources = gate_nodes(tmp_path, bases["llama"], PROMPTS, "hidden")
        got = evaluate_from_files(nodes, sources)
        want = mergekit_gates(tmp_path, bases["llama"], PROMPTS, "hidden", "native")
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
        assert cos.min() > 0.999
        assert (got - want).abs().max() < 1e-2

    @pytest.mark.parametrize("mode", ["cheap_embed", "hidden", "hidden_avg"])
    def test_through_op_moe(self, cli, tmp_path, bases, mode):
        """The whole path a user takes: `recipekit run` of an `op: moe` recipe writes these
        routers as each layer's Mixtral gate (fp32 output), as mergekit's in fp32."""
        base = bases["llama"]
        experts = [{"model": "base", "positive_prompts": list(p.positive),
                    **({"negative_prompts": list(p.negative)} if p.negative else {})}
                   for p in PROMPTS]
        recipe = write_recipe(tmp_path, json.dumps({
            "recipekit": 1, "models": {"base": str(base)},
            "steps": [{"name": "m", "op": "moe", "base": "base", "experts": experts,
                       "gate_mode": mode, "allow_identical_experts": True}],
            "output": {"path": "./out", "dtype": "float32"}}), name="recipe.json")
        result = cli("run", recipe, "-q")
        assert result.exit_code == 0, result.stderr
        from safetensors.torch import load_file

        out = load_file(tmp_path / "out" / "model.safetensors")
        got = torch.stack([out[f"model.layers.{i}.block_sparse_moe.gate.weight"]
                           for i in range(3)])
        torch.testing.assert_close(got, mergekit_gates(tmp_path, base, PROMPTS, mode),
                                   atol=1e-5, rtol=0)

    def test_no_bos_token(self, tmp_path):
        """A tokenizer without BOS (Qwen's): nothing is prepended and pads are EOS."""
        base = make_base(tmp_path / "nobos", "qwen2", bos=False)
        nodes, sources = gate_nodes(tmp_path, base, PROMPTS, "hidden_avg")
        want = mergekit_gates(tmp_path, base, PROMPTS, "hidden_avg")
        torch.testing.assert_close(evaluate_from_files(nodes, sources), want, atol=1e-5, rtol=0)


class TestStreaming:
    """The executor's sweep (run/execute.py `_FileSweepSource`): weights read from the files
    one layer at a time, once for every layer's router, and only the prompts' embedding rows."""

    def test_one_layer_of_weights_alive_at_a_time(self, tmp_path, bases, monkeypatch):
        nodes, sources = gate_nodes(tmp_path, bases["qwen2"], PROMPTS, "hidden")
        reads: list[str] = []
        alive: list[tuple[int, weakref.ref]] = []
        original = execute._FileSweepSource.read

        def read(self, node):
            layer = int(node.name.split(".")[2])
            others = [lay for lay, ref in alive if ref() is not None and lay != layer]
            assert not others, f"layer {layer} read while layer(s) {others} are held"
            value = original(self, node)
            alive.append((layer, weakref.ref(value)))
            reads.append(node.name)
            return value

        monkeypatch.setattr(execute._FileSweepSource, "read", read)
        evaluate_from_files(nodes, sources)
        layer_weights = [n for n in nodes[0].gates.weights]
        # each of layers 0 and 1 read once for all three routers; layer 2 (the last) never
        assert sorted(reads) == sorted(w.name for w in layer_weights)
        assert len(reads) == 2 * 12 and not any(".layers.2." in r for r in reads)

    def test_cheap_embed_reads_only_the_prompt_rows(self, tmp_path, bases, monkeypatch):
        nodes, sources = gate_nodes(tmp_path, bases["llama"], PROMPTS, "cheap_embed")
        rows: list[int] = []
        original = execute.read_rows

        def read_rows(node, plan, reader, lo, hi, **kw):
            rows.extend(range(lo, hi))
            return original(node, plan, reader, lo, hi, **kw)

        monkeypatch.setattr(execute, "read_rows", read_rows)
        monkeypatch.setattr(execute, "read_tensor", lambda *a, **k: pytest.fail("whole read"))
        got = evaluate_from_files(nodes[:1], sources)
        assert sorted(rows) == nodes[0].token_ids and len(rows) < 40  # of 82 rows
        # every layer's router is the one vector, as mergekit repeats it
        assert all(n is nodes[0] for n in nodes) and isinstance(nodes[0], CheapEmbedGates)
        torch.testing.assert_close(got[0].norm(dim=-1), torch.ones(2))

    def test_in_memory_equals_files(self, tmp_path, bases):
        """`Sweep.compute` over tensors in memory (how other tests evaluate nodes) gives the
        executor's bytes."""
        from safetensors.torch import load_file

        nodes, sources = gate_nodes(tmp_path, bases["mistral"], PROMPTS, "hidden")
        sweep = nodes[0].gates
        assert isinstance(sweep, HiddenGates)
        state = load_file(bases["mistral"] / "model.safetensors")
        value = sweep.compute(tuple(state[x.name] for x in sweep.inputs))
        assert torch.equal(value, evaluate_from_files([sweep], sources)[0])


def _error(tmp_path: Path, base: Path, prompts: list[ExpertPrompts], mode: str) -> str:
    with pytest.raises(RecipeError) as e:
        gate_nodes(tmp_path, base, prompts, mode)
    return str(e.value.render())


class TestErrors:
    """User errors are located at the step (recipe.yaml:5:5 is step 0: its keys are `op:
    moe`'s, which the stand-in step lacks) and name the fix."""

    def test_no_tokenizer(self, tmp_path, bases):
        base = tmp_path / "notok"
        base.mkdir()
        for f in ("config.json", "model.safetensors"):
            (base / f).write_bytes((bases["llama"] / f).read_bytes())
        text = _error(tmp_path, base, PROMPTS, "cheap_embed")
        assert text.splitlines()[0] == (
            f"{tmp_path}/recipe.yaml:5:5: steps[0].base: the base model 'base' has no "
            "tokenizer.json, which prompt gates tokenise with; use a base model saved with its "
            "fast tokenizer (`tokenizer.save_pretrained`), or a gate mode without prompts "
            "(`random`, `uniform_random`)")

    def test_unsupported_family(self, tmp_path):
        from tests.helpers.builders import make_model

        base = make_model("gemma", tmp_path / "gemma", layers=3)
        make_tokenizer(base)
        text = _error(tmp_path, base, PROMPTS, "hidden")
        assert text.splitlines()[0] == (
            f"{tmp_path}/recipe.yaml:5:5: steps[0].gate_mode: gate mode 'hidden' runs the base "
            "'base' layer by layer, and the forward cannot compute its model_type 'gemma' (it "
            "computes llama, mistral, qwen2, qwen3); use `cheap_embed` or `random` for this base")
        gate_nodes(tmp_path, base, PROMPTS, "cheap_embed")  # reads only embeddings: fine

    @pytest.mark.parametrize("empty", [(), ("",)])
    def test_empty_prompts(self, tmp_path, bases, empty):
        text = _error(tmp_path, bases["llama"], [PROMPTS[0], ExpertPrompts(empty)], "hidden")
        assert text.splitlines()[0] == (
            f"{tmp_path}/recipe.yaml:5:5: steps[0].experts[1].positive_prompts: expert 1 has no "
            "positive prompts; gate mode 'hidden' sets its router row from them; list prompts "
            "that should reach this expert")

    def test_unknown_mode(self, tmp_path, bases):
        text = _error(tmp_path, bases["llama"], PROMPTS, "hiden")
        assert "steps[0].gate_mode: gate mode 'hiden' is not computed from prompts" in text
        assert "cheap_embed, hidden, hidden_last, hidden_avg" in text

    def test_token_outside_the_table(self, tmp_path):
        base = make_base(tmp_path / "small", "llama")
        cfg = json.loads((base / "config.json").read_text())
        tf.LlamaForCausalLM(tf.LlamaConfig(**{**cfg, "vocab_size": 40})).save_pretrained(base)
        text = _error(tmp_path, base, PROMPTS, "cheap_embed")
        assert "outside the base's embedding table (40 rows)" in text


class TestPinning:
    """The tokenizer is a side file: `recipekit lock` pins it and `--frozen` refuses a change."""

    def test_lock_pins_the_tokenizer(self, tmp_path, bases):
        import shutil

        from recipekit.errors import LockError
        from recipekit.inputs.resolve import Sources
        from recipekit.tools.lock import build_lock, check_lock, lock_path, write_lock

        base = shutil.copytree(bases["llama"], tmp_path / "base")
        _, sources = gate_nodes(tmp_path, base, PROMPTS, "cheap_embed")
        recipe = load_recipe(tmp_path / "recipe.yaml")
        step = Step("gates", "moe", {"base": "base"}, 0)
        side = resolve_tokenizer(recipe, step, sources)
        assert side.lock_key == "steps.gates.tokenizer"
        assert [p.name for p in side.files] == ["tokenizer.json", "tokenizer_config.json"]
        pinned = Sources(dict(sources), {("gates", KEY): side})
        lock = build_lock(recipe, pinned)
        assert set(lock["inputs"]["steps.gates.tokenizer"]["files"]) == {
            "tokenizer.json", "tokenizer_config.json"}
        write_lock(lock_path(recipe.file), lock)
        check_lock(recipe, pinned, lock_path(recipe.file), full_hash=True)
        text = (base / "tokenizer.json").read_text()
        (base / "tokenizer.json").write_text(text.replace('"de"', '"ed"', 1))
        with pytest.raises(LockError, match="steps.gates.tokenizer: .*tokenizer.json has sha256"):
            check_lock(recipe, pinned, lock_path(recipe.file), full_hash=True)

    def test_meta_names_the_tokenizer_bytes(self, tmp_path, bases):
        """`prompt_gates_meta` (for `op: moe`'s meta, which the plan hash covers) changes
        with tokenizer.json's bytes."""
        import hashlib
        import shutil

        from recipekit.steps.moe_gates import prompt_gates_meta

        base = shutil.copytree(bases["llama"], tmp_path / "base")
        recipe = load_recipe(write_recipe(tmp_path, f"recipekit: 1\nmodels:\n  base: {base}\n"
                                          "steps:\n  - name: s\n    op: layers\n    from: base\n"
                                          "    layers: [0]\n"))
        step = Step("gates", "moe", {"base": "base"}, 0)
        side = resolve_tokenizer(recipe, step, resolve_sources(recipe))
        meta = prompt_gates_meta(replace(step, files={KEY: side}))
        digest = hashlib.sha256((base / "tokenizer.json").read_bytes()).hexdigest()
        assert meta == {"tokenizer": {"model": "base", "sha256": digest}}
        assert prompt_gates_meta(step) == {}


class TestPlanCost:
    """What the plan says of a forward: its working set, its note, its reads counted once."""

    def test_estimate_note_and_reads(self, tmp_path, bases):
        from recipekit.plan.compile import Plan
        from recipekit.plan.cost import working_set
        from recipekit.plan.render import _params, sweep_notes

        nodes, _ = gate_nodes(tmp_path, bases["llama"], PROMPTS, "hidden")
        sweep = nodes[0].gates
        layer = sum(w.nbytes for w in sweep.weights[:9])
        # a router holds the sweep's working set (one layer), not the swept weights as inputs
        assert sweep.layer_bytes == layer
        assert working_set(nodes[2]) == 2 * nodes[2].nbytes + sweep.nbytes + sweep.workspace
        tensors = [SimpleNamespace(name=f"r{i}", node=n) for i, n in enumerate(nodes)]
        plan = SimpleNamespace(shards=[SimpleNamespace(tensors=tensors)])
        assert sweep_notes(plan) == [sweep.describe()]  # once, not per layer
        assert sweep.describe().startswith(
            "forward of the base through 2 layer(s) for 5 prompt(s) (")
        json.dumps(_params(sweep))  # `plan --format json` can write the sweep's parameters
        weights = sum(w.nbytes for w in sweep.inputs)
        assert Plan.bytes_read_total.fget(plan) == weights  # the shared sweep read once


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCuda:
    """With ``--device cuda`` the forward runs on the device: the same routers within 1e-5."""

    @pytest.mark.parametrize("mode", ["cheap_embed", "hidden", "hidden_avg"])
    def test_cuda_equals_cpu(self, tmp_path, bases, mode):
        from recipekit.plan.cost import shared_values

        nodes, sources = gate_nodes(tmp_path, bases["qwen3"], PROMPTS, mode)
        plan = SimpleNamespace(sources=sources)
        with FileReader() as reader:
            rt = execute.Runtime(reader, torch.device("cuda"), None, None,  # type: ignore[arg-type]
                                 keep=shared_values(nodes))
            got = torch.stack([execute.evaluate(n, plan, rt) for n in nodes])  # type: ignore[arg-type]
        assert got.device.type == "cpu"
        torch.testing.assert_close(got, evaluate_from_files(nodes, sources), atol=1e-5, rtol=0)


class TestMoreErrors:
    """Prompts that give no tokens, and no experts at all."""

    def test_empty_prompt_without_bos(self, tmp_path):
        base = make_base(tmp_path / "nobos", "llama", bos=False)
        text = _error(tmp_path, base, [PROMPTS[0], ExpertPrompts(("story", ""))], "hidden")
        assert text.splitlines()[0] == (
            f"{tmp_path}/recipe.yaml:5:5: steps[0].experts[1].positive_prompts: prompt '' "
            "tokenises to no tokens (the base's tokenizer has no BOS token to prepend); write a "
            "non-empty prompt")

    def test_no_experts(self, tmp_path, bases):
        text = _error(tmp_path, bases["llama"], [], "cheap_embed")
        assert "steps[0]: gate mode 'cheap_embed' needs at least one expert with prompts" in text

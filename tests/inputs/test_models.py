"""sources.py: resolving local checkpoints from headers, and a `layer_prefix` recipe end to end.

Oracle: the files on disk (what the index and headers say) and the located messages users see.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from recipekit.inputs.models import iter_donor_files

from tests.helpers.permissions import unreadable_dir
from tests.helpers.recipes import write_recipe


def test_donor_files_skip_weights_and_bookkeeping(tmp_path):
    for rel in ["config.json", "tokenizer.json", "README.md", "model.safetensors",
                "model.safetensors.index.json", "pytorch_model.bin", "onnx/model.onnx",
                "1_Pooling/config.json", ".gitattributes", "recipekit.json", "vocab.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert [str(p) for p in iter_donor_files(tmp_path)] == [
        "tokenizer.json", "vocab.txt", "1_Pooling/config.json"]


def test_missing_shard_is_named(cli, tmp_path, tiny_llama):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((tiny_llama / "config.json").read_text())
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    r = write_recipe(tmp_path, "recipekit: 1\nmodels: {m: ./model}\noutput: {model: m}\n")
    result = cli("validate", r)
    assert result.exit_code == 2
    assert result.stderr.rstrip().endswith(
        "model/model-00001-of-00002.safetensors: shard 'model-00001-of-00002.safetensors' listed "
        "in model.safetensors.index.json is missing; the checkpoint download is incomplete")


def test_adapter_directory_is_not_a_model(cli, tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    r = write_recipe(tmp_path, "recipekit: 1\nmodels: {m: ./lora}\noutput: {model: m}\n")
    result = cli("validate", r)
    assert result.exit_code == 2
    assert "'./lora' is a PEFT adapter directory (adapter_config.json), not a model checkpoint" \
        in result.stderr


def test_model_without_steps_can_be_converted(cli, tmp_path, tiny_llama):
    r = write_recipe(tmp_path, f"recipekit: 1\nmodels: {{m: {tiny_llama}}}\n"
                     "output: {model: m, dtype: bfloat16, path: out}\n")
    assert cli("run", r, "-q").exit_code == 0
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16


def test_layer_prefix_slices_one_stack_of_a_two_stack_checkpoint(cli, tmp_path):
    """A VLM-shaped checkpoint: refused without `layer_prefix`, sliced with it; the vision stack
    and the nested text layer count follow exactly."""
    src = tmp_path / "vlm"
    src.mkdir()
    tensors = {"language_model.embed.weight": torch.randn(4, 2)}
    for i in range(3):
        tensors[f"language_model.model.layers.{i}.w"] = torch.full((2, 2), float(i))
    for i in range(2):
        tensors[f"vision_tower.encoder.layers.{i}.w"] = torch.full((3,), float(10 + i))
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({
        "model_type": "toy-vlm", "text_config": {"num_hidden_layers": 3},
        "vision_config": {"num_hidden_layers": 2}}))
    recipe = """
recipekit: 1
models:
  vlm: {source}
steps:
  - name: up
    op: layers
    from: vlm
    layers: [0, 1, 1, 2]
output: {{path: out}}
"""
    r = write_recipe(tmp_path, recipe.format(source="./vlm"))
    result = cli("validate", r)
    assert result.exit_code == 2
    assert "models.vlm: model 'vlm' (./vlm) has more than one layer stack" in result.stderr
    r = write_recipe(tmp_path, recipe.format(
        source="{path: ./vlm, layer_prefix: language_model.model.layers}"))
    result = cli("run", r, "-q")
    assert result.exit_code == 0, result.output
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert [float(got[f"language_model.model.layers.{i}.w"][0, 0]) for i in range(4)] == [
        0, 1, 1, 2]
    assert torch.equal(got["vision_tower.encoder.layers.1.w"], tensors[
        "vision_tower.encoder.layers.1.w"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 4
    assert config["vision_config"]["num_hidden_layers"] == 2


def test_layer_prefix_on_mergekits_picollava(cli, tmp_path, tiny_llava, tiny_llava_b):
    """mergekit's picoLLaVA shape (2 text and 2 vision layers, so both sub-configs hold the count
    2): with `layer_prefix` the text stack is restacked and the two VLMs merged. Oracle:
    transformers loads both outputs; the restacked one's logits equal those of the source model
    with its text layer 1 duplicated in torch, the merge's tensors are (a + b) / 2."""
    import copy

    from transformers import LlavaForConditionalGeneration

    from tests.helpers.builders import read_tensors
    from tests.helpers.vlm import llava_inputs

    r = write_recipe(tmp_path, f"""
recipekit: 1
models:
  a: {{path: {tiny_llava}, layer_prefix: language_model.model.layers}}
  b: {{path: {tiny_llava_b}, layer_prefix: language_model.model.layers}}
steps:
  - name: up
    op: layers
    from: a
    layers: [0, 1, 1]
  - name: mix
    op: merge
    method: linear
    from: [a, b]
    parameters: {{weight: 0.5}}
output: {{model: up, path: out}}
""")
    result = cli("run", r, "-q")
    assert result.exit_code == 0, result.output
    out = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert out.config.text_config.num_hidden_layers == 3
    assert out.config.vision_config.num_hidden_layers == 2
    ref = LlavaForConditionalGeneration.from_pretrained(tiny_llava).eval()
    layers = ref.model.language_model.layers
    layers.insert(2, copy.deepcopy(layers[1]))
    for i, layer in enumerate(layers):
        layer.self_attn.layer_idx = i
    ref.model.language_model.config.num_hidden_layers = 3  # Llama runs layers[:num_hidden_layers]
    with torch.no_grad():
        got = out(**llava_inputs(), use_cache=False).logits
        want = ref(**llava_inputs(), use_cache=False).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    text = r.read_text().replace("model: up, path: out", "model: mix, path: out-mix")
    r.write_text(text)
    result = cli("run", r, "-q")
    assert result.exit_code == 0, result.output
    a, b, mix = (read_tensors(p) for p in (tiny_llava, tiny_llava_b, tmp_path / "out-mix"))
    assert mix.keys() == a.keys()
    for name, t in mix.items():
        torch.testing.assert_close(t, (a[name] + b[name]) / 2, atol=1e-6, rtol=1e-6, msg=name)
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out-mix").eval()
    with torch.no_grad():
        assert torch.isfinite(merged(**llava_inputs()).logits).all()


def _sharded(tmp_path, tiny_llama):
    """tiny_llama as a one-shard sharded checkpoint, its index and a recipe that uses it."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((tiny_llama / "config.json").read_text())
    tensors = {}
    with safe_open(tiny_llama / "model.safetensors", "pt") as f:
        for k in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            tensors[k] = f.get_tensor(k)
    save_file(tensors, model / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    weight_map = dict.fromkeys(tensors, "model-00001-of-00001.safetensors")
    recipe = write_recipe(tmp_path, "recipekit: 1\nmodels: {m: ./model}\noutput: {model: m}\n")
    return model, weight_map, tensors, recipe


def test_validate_and_inspect_agree_on_a_stale_index(cli, tmp_path, tiny_llama):
    """Issue 17 item 14: a stale index (a listed tensor its shard lacks; a shard tensor the
    index does not list) used to pass `validate` but fail `inspect` with exit 1, or the other way
    round. Oracle: one verdict, the same message and exit 2 (headers alone show it) from both."""
    model, weight_map, tensors, recipe = _sharded(tmp_path, tiny_llama)
    index = model / "model.safetensors.index.json"
    listed_extra = {**weight_map, "ghost.weight": "model-00001-of-00001.safetensors"}
    unlisted = {k: v for k, v in weight_map.items() if k != "lm_head.weight"}
    expected = {
        json.dumps({"weight_map": listed_extra}):
            "tensor `ghost.weight` is listed in model.safetensors.index.json for "
            "model-00001-of-00001.safetensors but that file does not contain it",
        json.dumps({"weight_map": unlisted}):
            "model-00001-of-00001.safetensors holds tensor `lm_head.weight`, which "
            "model.safetensors.index.json does not list",
    }
    for text, message in expected.items():
        index.write_text(text)
        for args in (("validate", recipe), ("inspect", model, "-q", "--headers-only")):
            result = cli(*args)
            assert result.exit_code == 2, (args, result.output)
            assert message in result.stderr
            assert "the index is stale or the shard is from another checkpoint" in result.stderr
    index.write_text(json.dumps({"weight_map": weight_map}))
    assert cli("validate", recipe).exit_code == 0
    assert cli("inspect", model, "-q", "--headers-only").exit_code == 0


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("command", ["validate", "plan", "run", "lock"])
def test_unreadable_model_directory_is_named(cli, tmp_path, tiny_llama, monkeypatch, command):
    """A model directory the user may not read (mode 000) is exit 2 naming it, like an
    unreadable config.json, not an internal PermissionError; nothing is written."""
    m = tmp_path / "m"
    shutil.copytree(tiny_llama, m)
    r = write_recipe(tmp_path, "recipekit: 1\nmodels: {tiny: ./m}\nsteps: [{name: up, op: "
                     "layers, from: tiny, layers: [\"range(0,6)\"]}]\noutput: {path: out}\n")
    before = _listing(tmp_path)
    with unreadable_dir(m, monkeypatch):
        result = cli(command, r)
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"{m}: cannot read: Permission denied; give the user running "
                             "recipekit read and search permission on it (chmod u+rx)\n")
    assert _listing(tmp_path) == before


def test_unreadable_adapter_directory_is_named(cli, tmp_path, tiny_llama, monkeypatch):
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    r = write_recipe(tmp_path, f"recipekit: 1\nmodels: {{tiny: {tiny_llama}}}\n"
                     "adapters: {lora: ./lora}\nsteps: [{name: f, op: adapters, from: tiny, "
                     "adapters: [{use: lora}]}]\noutput: {path: out}\n")
    with unreadable_dir(adapter, monkeypatch):
        result = cli("validate", r)
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"{adapter}: cannot read: Permission denied; give the user "
                             "running recipekit read and search permission on it (chmod u+rx)\n")

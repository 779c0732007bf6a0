"""convert.py / `recipekit convert --allow-pickle`: pickle checkpoints and adapters to safetensors.

Oracles: the pickled tensors themselves (torch.equal), transformers loading the converted model,
and PEFT producing the same outputs from the converted adapter as from the pickled one.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from tests.helpers.builders import load_model, make_model, read_tensors
from tests.helpers.recipes import solar_recipe, write_recipe


def pickled(tmp_path, family="llama", shards=1):
    """A pickle checkpoint as transformers < 5 wrote it (transformers 5 writes only
    safetensors): `pytorch_model.bin`, or shards plus `pytorch_model.bin.index.json`."""
    path = tmp_path / "pickled"
    model = load_model(family, make_model(family, tmp_path / "src", layers=4))
    model.config.save_pretrained(path)
    state = model.state_dict()
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return model, path
    names = list(state)
    weight_map = {}
    for k in range(shards):
        fname = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[k::shards]}
        torch.save(part, path / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    return model, path



def test_refuses_without_allow_pickle(cli, tmp_path):
    _, src = pickled(tmp_path)
    result = cli("convert", src, tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.startswith("refusing to unpickle without --allow-pickle; pickle files "
                                    "can run arbitrary code when loaded")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_single_file_checkpoint(cli, tmp_path, family):
    import transformers as tf

    model, src = pickled(tmp_path, family)
    assert (src / "pytorch_model.bin").is_file()
    result = cli("convert", "--allow-pickle", src, tmp_path / "out")
    assert result.exit_code == 0, result.output
    original = torch.load(src / "pytorch_model.bin", weights_only=True)
    got = read_tensors(tmp_path / "out")
    assert got.keys() == original.keys()
    assert (tmp_path / "out" / "config.json").is_file()
    for k, t in original.items():
        assert torch.equal(got[k], t) and got[k].dtype == t.dtype, k
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.arange(10)[None]
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_sharded_checkpoint_then_run(cli, tmp_path):
    model, src = pickled(tmp_path, shards=3)
    assert (src / "pytorch_model.bin.index.json").is_file()
    result = cli("convert", "--allow-pickle", src, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").glob("model-*-of-00003.safetensors"))) == 3
    # the index's total_size is the written tensors' bytes, not the source's metadata ({})
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": sum(
        t.numel() * t.element_size() for t in model.state_dict().values())}
    # `verify` checks run outputs; a conversion is named as such (it said "did not finish")
    result = cli("verify", tmp_path / "out")
    assert result.exit_code == 2 and "is a finished `recipekit convert` output" in result.stderr
    r = write_recipe(tmp_path, solar_recipe("./out", '["range(0,4)", "range(1,4)"]',
                                            "  path: ./grown"))
    result = cli("run", r, "-q")
    assert result.exit_code == 0, result.output
    got = read_tensors(tmp_path / "grown")
    assert torch.equal(got["model.layers.4.mlp.up_proj.weight"],
                       model.state_dict()["model.layers.1.mlp.up_proj.weight"])


def test_pickled_peft_adapter(cli, tmp_path):
    import peft

    base = load_model("llama", make_model("llama", tmp_path / "base", layers=2))
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8,
                                                     target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_()
    lora.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()
    result = cli("convert", "--allow-pickle", tmp_path / "adapter", tmp_path / "adapter-st")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adapter-st" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter-st" / "adapter_config.json").is_file()
    fresh = load_model("llama", tmp_path / "base")
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter-st")
    ids = torch.arange(12)[None]
    assert torch.equal(reloaded(ids).logits, lora(ids).logits)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_in_a_pickle_is_not_run(cli, tmp_path):
    src = tmp_path / "evil"
    src.mkdir()
    marker = tmp_path / "pwned"
    with open(src / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": Payload(str(marker))}, f)
    result = cli("convert", "--allow-pickle", src, tmp_path / "out")
    assert result.exit_code == 1
    assert "cannot load as weights-only pickle" in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()  # nothing written, not even the directory


def test_a_whole_pickled_model_leaves_no_interrupted_conversion(cli, tmp_path):
    """`torch.save(model)` pickles the module object, which a weights-only load refuses: the
    refusal comes before the state file, so a rerun does not "resume" into it, and an empty
    directory the user made stays empty."""
    model, src = pickled(tmp_path)
    (src / "pytorch_model.bin").unlink()
    torch.save(model, src / "pytorch_model.bin")
    (tmp_path / "out").mkdir()
    for _ in range(2):
        result = cli("convert", "--allow-pickle", src, tmp_path / "out")
        assert result.exit_code == 1, result.stderr
        assert "cannot load as weights-only pickle" in result.stderr
        assert list((tmp_path / "out").iterdir()) == []


def test_an_unreadable_pickle_is_named_as_such(cli, tmp_path, monkeypatch):
    """A pickle this user may not read is not "damaged, or holds more than tensors": exit 2,
    "cannot read: Permission denied", as for every input (the kernel's answer simulated: as
    root a mode-000 file stays readable)."""
    _, src = pickled(tmp_path)

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(torch, "load", denied)
    result = cli("convert", "--allow-pickle", src, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"{src / 'pytorch_model.bin'}: cannot read: Permission "
                                    "denied; give the user running recipekit read permission")
    assert not (tmp_path / "out").exists()


def test_never_writes_into_a_non_empty_directory(cli, tmp_path):
    _, src = pickled(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    result = cli("convert", "--allow-pickle", src, tmp_path / "out")
    assert result.exit_code == 2
    assert "exists and is not an empty directory" in result.stderr


def test_run_names_the_convert_command(cli, tmp_path):
    _, src = pickled(tmp_path)
    result = cli("run", write_recipe(tmp_path, solar_recipe("./pickled", "[0]")), "-q")
    assert result.exit_code == 2
    assert "holds only pickle weights (pytorch_model.bin); `run` does not load pickles" in \
        result.stderr
    assert "recipekit convert --allow-pickle ./pickled <new dir>" in result.stderr

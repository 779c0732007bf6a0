"""convert.py / `recipekit convert --allow-pickle`: pickle checkpoints and adapters to safetensors.

Oracles: the pickled tensors themselves (torch.equal), transformers loading the converted model,
and PEFT producing the same outputs from the converted adapter as from the pickled one.
"""

from __future__ import annotations

import functools
import json
import os
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


class ShellPayload(Payload):
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(("payload", "refers_to"), [(Payload, "`io.open`"),
                                                    (ShellPayload, f"`{os.name}.system`")])
def test_code_in_a_pickle_is_not_run(cli, tmp_path, payload, refers_to):
    """The refusal names the global the pickle would call and says recipekit never runs it,
    in whole sentences (torch's text was cut at 200 characters, mid-way through its advice to
    retry with weights_only=False)."""
    src = tmp_path / "evil"
    src.mkdir()
    marker = tmp_path / "pwned"
    raw = functools.partial(pickle.dump, protocol=2)  # a protocol torch's unpickler reads
    for name, dump in (("pytorch_model.bin", torch.save), ("adapter_model.bin", raw)):
        with open(src / name, "wb") as f:
            dump({"w": payload(str(marker))}, f)
        result = cli("convert", "--allow-pickle", src, tmp_path / "out")
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith(
            f"{src / name}: cannot load as weights-only pickle: it refers to {refers_to}, "
            "which is neither a tensor nor a plain container; recipekit never unpickles "
            "arbitrary code, so the file is not converted; the file holds code or a whole "
            "pickled object, not a state dict of tensors"), result.stderr
        assert "weights_only=False" not in result.stderr
        assert "weights_only` set to `False`" not in result.stderr
        assert not marker.exists()
        assert not (tmp_path / "out").exists()  # nothing written, not even the directory
        (src / name).unlink()


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


def saved(directory, files):
    """A source directory holding ``files``: name -> state dict (torch.save) or text."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, str):
            (directory / name).write_text(content)
        else:
            torch.save(content, directory / name)
    return directory


def sharded(tmp_path, parts, index=None):
    """A sharded pickle checkpoint: ``parts`` is one state dict per shard; the index maps each
    tensor to its shard unless ``index`` (tensor -> shard number) says otherwise."""
    n = len(parts)
    fname = [f"pytorch_model-{k + 1:05d}-of-{n:05d}.bin" for k in range(n)]
    weight_map = {t: fname[k] for k, part in enumerate(parts) for t in part}
    if index is not None:
        weight_map = {t: fname[k] for t, k in index.items()}
    src = saved(tmp_path / "src", dict(zip(fname, parts, strict=True)))
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return src


def interrupt_after_first_shard(monkeypatch):
    """Ctrl-C just after the first shard is recorded in the state file (exit 130)."""
    from recipekit.io.output import OutputDir

    finished = OutputDir.mark_finished

    def mark_then_stop(self, *args, **kwargs):
        finished(self, *args, **kwargs)
        monkeypatch.setattr(OutputDir, "mark_finished", finished)
        raise KeyboardInterrupt

    monkeypatch.setattr(OutputDir, "mark_finished", mark_then_stop)


def three_shards(tmp_path):
    parts = [{f"w{k}": torch.full((256,), float(k))} for k in range(3)]
    return parts, sharded(tmp_path, parts)


def test_two_pickles_that_would_become_one_file_are_refused(cli, tmp_path):
    """`pytorch_model.bin` and `model.bin` both map to model.safetensors: converting both kept
    only the second's tensors (exit 0)."""
    src = saved(tmp_path / "src", {"pytorch_model.bin": {"a": torch.ones(2)},
                                   "model.bin": {"b": torch.zeros(2)}})
    result = cli("convert", "--allow-pickle", src, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"{src}: pytorch_model.bin and model.bin would both become "
                                    "model.safetensors")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("tensor", "why"), [
    (torch.eye(3).to_sparse(), "is a sparse_coo tensor; safetensors holds dense tensors only"),
    (torch.empty(3, 4, device="meta"), "is a meta tensor: it has a shape but no data"),
    (torch.ones(3).to(torch.float8_e4m3fn), "has dtype float8_e4m3fn, which recipekit does not "
     "convert (it reads no fp8 checkpoints)"),
    (torch.ones(3).to(torch.float8_e5m2), "has dtype float8_e5m2"),
])
def test_tensors_safetensors_cannot_hold_are_refused_before_writing(cli, tmp_path, tensor, why):
    """Named with the tensor and its pickle, exit 2, nothing written (they used to be an
    internal error, an endless "Bad address ... resumes", or a refusal naming the output)."""
    src = saved(tmp_path / "src", {"pytorch_model.bin": {"ok": torch.ones(2), "w": tensor}})
    result = cli("convert", "--allow-pickle", src, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"{src / 'pytorch_model.bin'}: tensor `w` {why}")
    assert not (tmp_path / "out").exists()


def test_a_tensor_named_like_the_header_metadata_is_refused(cli, tmp_path):
    """safetensors reserves `__metadata__`: the file written under that name opened nowhere."""
    src = saved(tmp_path / "src", {"pytorch_model.bin": {"__metadata__": torch.ones(2),
                                                         "ok": torch.ones(2)}})
    result = cli("convert", "--allow-pickle", src, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"{src / 'pytorch_model.bin'}: tensor `__metadata__` has the "
                                    "name safetensors reserves for a file's metadata")
    assert not (tmp_path / "out").exists()


def test_a_refused_later_shard_leaves_no_interrupted_conversion(cli, tmp_path):
    """Every pickle is checked before the state file: a bad third shard is refused with no
    shard written (a rerun used to "resume" into the same refusal)."""
    parts = [{"a": torch.ones(2)}, {"b": torch.ones(2)}, {"c": torch.eye(2).to_sparse()}]
    src = sharded(tmp_path, parts)
    result = cli("convert", "--allow-pickle", src, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "pytorch_model-00003-of-00003.bin: tensor `c` is a sparse_coo tensor" in result.stderr
    assert not (tmp_path / "out").exists()


def test_unsigned_dtypes_and_negated_views_are_converted_as_they_are(cli, tmp_path):
    """U16/U32/U64 are safetensors dtypes recipekit's table has (they were refused); a tensor
    saved as a negated view (its neg bit set) is written as the values it shows (it was
    written unnegated). Oracle: safetensors' own loader against the pickled tensors."""
    from safetensors.torch import load_file

    state = {"u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
             "u32": torch.tensor([0, 7, 2**32 - 1], dtype=torch.uint32),
             "u64": torch.tensor([0, 9, 2**63 + 5], dtype=torch.uint64),
             "neg": torch._neg_view(torch.arange(4.0))}
    src = saved(tmp_path / "src", {"pytorch_model.bin": state})
    result = cli("convert", "--allow-pickle", src, tmp_path / "out")
    assert result.exit_code == 0, result.output
    got = load_file(tmp_path / "out" / "model.safetensors")
    original = torch.load(src / "pytorch_model.bin", weights_only=True)
    assert original["neg"].is_neg()
    for k, t in original.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t.resolve_neg()), k
    assert torch.equal(got["neg"], -torch.arange(4.0))


def test_trainer_pickles_are_not_copied(cli, tmp_path):
    """A trainer checkpoint's optimizer.pt, scheduler.pt, rng_state.pth and training_args.bin
    are pickles a safetensors checkpoint must not carry: skipped like a run's donor files skip
    them, each with a warning (the .pt/.pth were copied, training_args.bin silently dropped)."""
    from recipekit.inputs.models import iter_donor_files

    src = saved(tmp_path / "src", {
        "pytorch_model.bin": {"w": torch.ones(2)}, "optimizer.pt": {"m": torch.ones(2)},
        "scheduler.pt": {"s": torch.ones(1)}, "rng_state.pth": {"r": torch.ones(1)},
        "training_args.bin": {"t": torch.ones(1)}, "config.json": '{"model_type": "llama"}',
        "trainer_state.json": "{}", "model.safetensors.index.json": "{}"})
    result = cli("convert", "--allow-pickle", src, tmp_path / "out")
    assert result.exit_code == 0, result.output
    copied = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert copied == ["config.json", "model.safetensors", "trainer_state.json"]
    assert {p.as_posix() for p in iter_donor_files(src)} == {"trainer_state.json"}  # run's
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin",
                 "model.safetensors.index.json"):
        assert f"{src / name}: not copied to the output: it is a weight, pickle or index file" \
            in result.stderr, name


def test_a_resume_keeps_a_file_put_at_a_shard_name_not_written_yet(cli, tmp_path, monkeypatch):
    """As `run` does (io/output.py `_check_replaced`): exit 2 naming the file, which is kept;
    moved away, the rerun finishes."""
    parts, src = three_shards(tmp_path)
    out = tmp_path / "out"
    interrupt_after_first_shard(monkeypatch)
    assert cli("convert", "--allow-pickle", src, out).exit_code == 130
    assert (out / "model-00001-of-00003.safetensors").is_file()
    planted = out / "model-00003-of-00003.safetensors"
    planted.write_text("my notes")
    (out / "model.safetensors.index.json").write_text('{"mine": 1}')
    result = cli("convert", "--allow-pickle", src, out)
    assert result.exit_code == 2, result.output
    assert f"{planted} is not a file this run wrote" in result.stderr
    assert planted.read_text() == "my notes"
    planted.unlink()
    result = cli("convert", "--allow-pickle", src, out)
    assert result.exit_code == 2, result.output  # the index name too, as `run` refuses it
    assert "model.safetensors.index.json is not a file this run wrote" in result.stderr
    assert (out / "model.safetensors.index.json").read_text() == '{"mine": 1}'
    (out / "model.safetensors.index.json").unlink()
    result = cli("convert", "--allow-pickle", src, out)
    assert result.exit_code == 0, result.output
    got = read_tensors(out)
    for part in parts:
        for k, t in part.items():
            assert torch.equal(got[k], t), k


def test_a_resume_after_a_full_disk_needs_only_what_is_left(cli, tmp_path, monkeypatch):
    """The free-space check counted the shards already finished, so a conversion stopped by a
    full disk was refused until there was room for all of it again."""
    import shutil

    from recipekit.io import output

    _, src = three_shards(tmp_path)
    out = tmp_path / "out"
    interrupt_after_first_shard(monkeypatch)
    assert cli("convert", "--allow-pickle", src, out).exit_code == 130
    shard = (out / "model-00001-of-00003.safetensors").stat().st_size
    real = shutil.disk_usage(out)
    free = 2 * shard + os.path.getsize(src / "pytorch_model.bin.index.json") + 100
    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: real._replace(free=free))
    assert sum(f.stat().st_size for f in src.iterdir()) > free  # the whole would not fit
    result = cli("convert", "--allow-pickle", src, out)
    assert result.exit_code == 0, result.output
    assert len(read_tensors(out)) == 3
    # the summary counts what this run wrote, and says it resumed ("3 tensors in 3 files")
    assert result.stdout.startswith(f"wrote {out}: 2 tensors in 2 file(s), ")
    assert result.stdout.rstrip().endswith("; resumed an interrupted conversion: 1 file(s) it "
                                           "had converted were kept")


def test_a_full_disk_says_what_applies_to_a_conversion(cli, tmp_path, monkeypatch):
    """The writer's hint named `recipekit plan`, which knows nothing of a conversion."""
    import errno

    from recipekit.io.writer import ShardWriter

    def full(self, view):
        raise OSError(errno.ENOSPC, "No space left on device")

    _, src = three_shards(tmp_path)
    monkeypatch.setattr(ShardWriter, "_write_all", full)
    result = cli("convert", "--allow-pickle", src, tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "disk full while writing; free space (this conversion had" in result.stderr
    assert "running the same command again resumes" in result.stderr
    assert "recipekit plan" not in result.stderr


def test_killed_while_writing_its_first_state_file_resumes(cli, tmp_path):
    """A kill leaves only the state file's temp name: the output was "not an empty directory"
    for ever; like `run`, a rerun replaces its own temp file."""
    _, src = three_shards(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "..recipekit-state.json.recipekit-partial").write_text('{"plan_')
    result = cli("convert", "--allow-pickle", src, out)
    assert result.exit_code == 0, result.output
    assert len(read_tensors(out)) == 3
    assert not [p for p in out.iterdir() if p.name.endswith(".recipekit-partial")]


W0, W1, EXTRA = {"w0": torch.ones(2)}, {"w1": torch.ones(2)}, {"extra": torch.ones(1)}


@pytest.mark.parametrize(("parts", "index", "message"), [
    ([W0, W1 | EXTRA], {"w0": 0, "w1": 1}, "pytorch_model-00002-of-00002.bin holds tensor "
     "`extra`, which pytorch_model.bin.index.json does not list"),
    ([W0 | EXTRA, W1 | EXTRA], {"w0": 0, "w1": 1, "extra": 1}, "pytorch_model-00001-of-00002.bin "
     "holds tensor `extra`, which pytorch_model.bin.index.json maps to "
     "pytorch_model-00002-of-00002.bin"),  # in two shards
    ([W0, W1], {"w0": 0, "w1": 1, "gone": 1}, "pytorch_model-00002-of-00002.bin: tensor `gone` "
     "is listed in pytorch_model.bin.index.json for pytorch_model-00002-of-00002.bin but that "
     "file does not contain it"),
])
def test_a_stale_pickle_index_is_refused(cli, tmp_path, parts, index, message):
    """A shard and the index disagree: the converted index would be one `run` and `inspect`
    refuse (it was written, exit 0). Refused like run's stale index, exit 2, before writing."""
    src = sharded(tmp_path, parts, index=index)
    result = cli("convert", "--allow-pickle", src, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "the index is stale or a shard is from another checkpoint" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_truncated_pickle_is_named_as_damaged_in_whole_sentences(cli, tmp_path):
    src = saved(tmp_path / "src", {"pytorch_model.bin": {"w": torch.ones(1000)}})
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[:len(data) // 2])
    result = cli("convert", "--allow-pickle", src, tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (
        f"{src / 'pytorch_model.bin'}: cannot load as weights-only pickle: RuntimeError: "
        "PytorchStreamReader failed reading zip archive: failed finding central directory; the "
        "file is damaged or incomplete (copy or download it again), or is not a torch "
        "checkpoint")


def test_a_missing_source_is_said_not_to_exist(cli, tmp_path):
    result = cli("convert", "--allow-pickle", tmp_path / "nope", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"{tmp_path / 'nope'}: does not exist")

"""Every user mistake: a located one-paragraph message, the right exit code, no traceback.

Oracle: the exact message text (file:line:col, key path, what to do), pinned here so a change
to a message is a deliberate change to this file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.helpers.recipes import solar_recipe, write_recipe


def run_fails(cli, recipe: Path, code: int, *extra: str) -> str:
    result = cli("run", recipe, "-q", *extra)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    return result.stderr


def validate_fails(cli, recipe: Path) -> str:
    result = cli("validate", recipe)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.stderr


def first_line(text: str) -> str:
    return text.splitlines()[0]


@pytest.fixture
def recipe_dir(tmp_path: Path, model_copy: Path) -> Path:
    return tmp_path


def solar(recipe_dir: Path, layers: str = '["range(0,6)", "range(2,8)"]') -> Path:
    return write_recipe(recipe_dir, solar_recipe(layers=layers))


class TestRecipeMistakes:
    """Exit code 2, located at the user's own line with a caret."""

    def test_unknown_key(self, cli, recipe_dir):
        r = write_recipe(recipe_dir, """
            recipekit: 1
            models:
              tiny: ./model
            steps:
              - name: up
                op: layers
                from: tiny
                layerz: [0, 1]
        """)
        err = run_fails(cli, r, 2)
        # one mistake, one error: not also "missing required key `layers`"
        assert err.splitlines()[0] == (
            f"{r}:8:5: steps[0].layerz: unknown key in step 'up' (op: layers); did you mean "
            "'layers'?")
        assert "        layerz: [0, 1]\n        ^" in err
        assert "missing" not in err and "1 error" not in err

    def test_misspelled_op_key(self, cli, recipe_dir):
        """Without `op:` a step's keys are not checked, so `opp:` is named as the typo
        (a missing `op` alone would not say where the mistake is)."""
        r = write_recipe(recipe_dir, solar_recipe(layers="[0]").replace("op: layers",
                                                                          "opp: layers"))
        err = run_fails(cli, r, 2)
        assert first_line(err) == (f"{r}:6:5: steps[0].opp: unknown key in step 'up' (op: ?); "
                                   "did you mean 'op'? (`op:` is required here)")

    @pytest.mark.parametrize("written,line", [
        ("tokenizer: {source: union, tokns: {}}",
         "steps[0].tokenizer.tokns: unknown key in step 'm' (op: merge); did you mean "
         "'tokens'?"),
        ("alpha: {gradiant: [0, 1]}",
         "steps[0].alpha.gradiant: unknown key in step 'm' (op: interpolate); did you mean "
         "'gradient'?"),
        ('alpha: [{mach: "*mlp*", value: 1}, {value: 0}]',
         "steps[0].alpha[0].mach: unknown key in step 'm' (op: interpolate); did you mean "
         "'match'?")])
    def test_misspelled_nested_key(self, cli, recipe_dir, written, line):
        """A typo inside a nested mapping is named with the closest key, and the valid keys
        beside it are not called unknown (found by a black-box check: `source` was)."""
        op = "merge\n    method: linear" if "tokenizer" in written else "interpolate"
        r = write_recipe(recipe_dir, "recipekit: 1\nmodels: {a: ./model, b: ./model}\n"
                         f"steps:\n  - name: m\n    op: {op}\n    from: [a, b]\n"
                         f"    {written}\n")
        err = validate_fails(cli, r)
        assert err.count(": unknown key") == 1 and line in first_line(err)

    def test_every_mistake_in_a_nested_mapping(self, cli, recipe_dir):
        """A typo and a bad value in the one form of a oneOf the user meant are both named."""
        r = write_recipe(recipe_dir, "recipekit: 1\nmodels: {a: ./model, b: ./model}\n"
                         "steps:\n  - {name: m, op: merge, method: linear, from: [a, b], "
                         "tokenizer: {source: union, pad_to_multiple_of: -64, tokns: {}}}\n")
        err = validate_fails(cli, r)
        assert "steps[0].tokenizer.pad_to_multiple_of: -64 is below the minimum 1" in err
        assert "steps[0].tokenizer.tokns: unknown key" in err and "2 errors found" in err

    def test_a_misspelled_required_key_is_one_error(self, cli, recipe_dir):
        r = write_recipe(recipe_dir, "recipekit: 1\nmodels: {a: ./model, b: ./model}\n"
                         "steps:\n  - {name: m, op: moe, base: a, experts: [{modle: b}, "
                         "{model: a}], gate_mode: random}\n")
        err = validate_fails(cli, r)
        assert first_line(err).endswith("steps[0].experts[0].modle: unknown key in step 'm' "
                                        "(op: moe); did you mean 'model'?")
        assert "missing required key" not in err

    def test_misspelled_op(self, cli, recipe_dir):
        r = write_recipe(recipe_dir, solar_recipe(layers="[0]").replace("op: layers",
                                                                          "op: layres"))
        err = run_fails(cli, r, 2)
        assert first_line(err) == (f"{r}:6:9: steps[0].op: unknown op 'layres'; did you mean "
                                   "'layers'? allowed: layers, interpolate, merge, head, reinit, "
                                   "adapters, combine_adapters, extract_lora, coalesce, "
                                   "decoalesce, moe")

    def test_duplicate_key(self, cli, recipe_dir):
        r = write_recipe(recipe_dir, solar_recipe(layers="[0]") + "  path: ./elsewhere\n")
        err = run_fails(cli, r, 2)
        assert first_line(err) == (f"{r}:11:3: output.path: duplicate key `path` (first defined "
                                   "on line 10); remove one of them; YAML would silently keep "
                                   "only the last")

    def test_reversed_range(self, cli, recipe_dir):
        r = solar(recipe_dir, '["range(3,1)"]')
        assert first_line(run_fails(cli, r, 2)) == (
            f"{r}:8:14: steps[0].layers[0]: 'range(3,1)' is empty (start 3 is past stop 1); did "
            "you mean range(1,3)?")

    def test_empty_range(self, cli, recipe_dir):
        r = solar(recipe_dir, '["range(0,0)"]')
        assert first_line(run_fails(cli, r, 2)) == (
            f"{r}:8:14: steps[0].layers[0]: 'range(0,0)' is empty (start equals stop); ranges are "
            "half-open, so range(0,1) selects layer 0")

    def test_layer_beyond_model(self, cli, recipe_dir):
        r = solar(recipe_dir, '["range(0,6)", "range(4,9)"]')
        assert first_line(run_fails(cli, r, 2)) == (
            f"{r}:8:28: steps[0].layers[1]: range(4,9) reaches layer 8, but model 'tiny' has 8 "
            "layers (0-7); use indices below 8")

    def test_single_layer_beyond_model(self, cli, recipe_dir):
        r = solar(recipe_dir, "[0, 12]")
        assert first_line(run_fails(cli, r, 2)) == (
            f"{r}:8:17: steps[0].layers[1]: layer 12, but model 'tiny' has 8 layers (0-7); use "
            "indices below 8")

    def test_unknown_step_name(self, cli, recipe_dir):
        r = write_recipe(recipe_dir, solar_recipe(layers="[0]") + "  model: upp\n")
        assert first_line(run_fails(cli, r, 2)) == (
            f"{r}:11:10: output.model: unknown model or step 'upp'; did you mean 'up'? known "
            "models and steps: tiny, up")

    def test_cycle(self, cli, recipe_dir):
        r = write_recipe(recipe_dir, """
            recipekit: 1
            models:
              tiny: ./model
            steps:
              - name: a
                op: layers
                from: b
                layers: [0]
              - name: b
                op: layers
                from: a
                layers: [0]
        """)
        assert first_line(run_fails(cli, r, 2)) == (
            f"{r}:5:11: steps[0].name: steps form a cycle: a -> b -> a; a step can only use "
            "models and steps that do not depend on it")

    def test_problems_are_collected(self, cli, recipe_dir):
        r = write_recipe(recipe_dir, """
            recipekit: 1
            models:
              tiny: ./model
            steps:
              - name: up
                op: layers
                from: tiny
                alpha: 0.5
                layers: ["range(2,2)", {from: tyny, range: [0, 2]}]
            output:
              dtype: bf16
        """)
        err = run_fails(cli, r, 2)
        lines = [ln for ln in err.splitlines() if ln.startswith(str(r))]
        assert [ln.split(": ")[1] for ln in lines] == [
            "steps[0].alpha", "steps[0].layers[0]", "steps[0].layers[1].from", "output.dtype"]
        assert "output.dtype: unknown value 'bf16'; did you mean 'bfloat16'?" in err
        assert err.splitlines()[-1] == "4 errors found; nothing was written."

    @pytest.mark.parametrize(("written", "message"), [
        ("[-1]", "'-1': layer indices must not be negative; layers count from 0; to select "
                 "layers from the end, write the index, e.g. 31 for the last of 32"),
        ('["0"]', "'0' is not a layer index or range; write an integer, \"range(start, stop)\" "
                  "or \"range(start, stop, step)\""),
        ('["[1, 2]"]', "'[1, 2]' is not a layer index or range; write an integer, "
                       "\"range(start, stop)\" or \"range(start, stop, step)\""),
    ])
    def test_a_bad_layer_entry_is_reported_once(self, cli, recipe_dir, written, message):
        r = solar(recipe_dir, written)
        err = run_fails(cli, r, 2)
        assert err.splitlines()[0] == f"{r}:8:14: steps[0].layers[0]: {message}"
        assert [ln for ln in err.splitlines() if ln.startswith(str(r))] == [err.splitlines()[0]]

    def test_non_finite_parameters_are_refused(self, cli, recipe_dir, tiny_llama_b):
        """`alpha: .nan` wrote an all-NaN checkpoint with exit 0 (issue 17 item 8)."""
        r = write_recipe(recipe_dir, f"""
            recipekit: 1
            models:
              a: ./model
              b: {tiny_llama_b}
            steps:
              - name: s
                op: interpolate
                from: [a, b]
                alpha: [{{match: "*.mlp.*", value: {{gradient: [0, .inf]}}}}, {{value: .nan}}]
        """)
        err = run_fails(cli, r, 2)
        assert [ln for ln in err.splitlines() if ln.startswith(str(r))] == [
            f"{r}:9:54: steps[0].alpha[0].value.gradient[1]: inf is not a finite number; "
            "parameters must be finite numbers",
            f"{r}:9:71: steps[0].alpha[1].value: nan is not a finite number; parameters must be "
            "finite numbers"]
        assert not (recipe_dir / "out").exists()

    def test_non_finite_json_parameter(self, cli, recipe_dir):
        r = write_recipe(recipe_dir, '{"recipekit": 1, "models": {"a": "./model"}, "steps": '
                         '[{"name": "s", "op": "merge", "method": "linear", "from": '
                         '[{"model": "a", "weight": -Infinity}]}]}', name="r.json")
        err = run_fails(cli, r, 2)
        assert first_line(err) == (f"{r}:1:139: steps[0].from[0].weight: -inf is not a finite "
                                   "number; parameters must be finite numbers")

    def test_wrong_version(self, cli, recipe_dir):
        r = write_recipe(recipe_dir, solar_recipe(layers="[0]").replace("recipekit: 1",
                                                                         "recipekit: 2"))
        assert first_line(run_fails(cli, r, 2)) == (
            f"{r}:1:12: recipekit: unsupported recipe format version 2; this recipekit reads "
            "`recipekit: 1`")

    def test_invalid_yaml(self, cli, recipe_dir):
        r = write_recipe(recipe_dir, "recipekit: 1\nmodels: [\n")
        assert first_line(run_fails(cli, r, 2)).startswith(f"{r}:3:1: invalid YAML: ")

    def test_missing_recipe_file(self, cli, tmp_path):
        err = run_fails(cli, tmp_path / "nope.yaml", 2)
        assert first_line(err) == (f"{tmp_path / 'nope.yaml'}: recipe file not found; check the "
                                   "path; recipes are YAML (.yaml/.yml) or JSON (.json)")


class TestInputMistakes:
    """Problems with the checkpoints a recipe names."""

    def test_missing_model_dir(self, cli, tmp_path):
        r = write_recipe(tmp_path, solar_recipe(layers="[0]").replace("./model", "./missing"))
        err = run_fails(cli, r, 2)
        assert first_line(err).startswith(
            f"{r}:3:9: models.tiny: model directory './missing' does not exist (")
        assert first_line(err).endswith("; check the path (relative paths are relative to the "
                                        "recipe file)")

    def test_hub_looking_name_gets_a_hint(self, cli, tmp_path):
        r = write_recipe(tmp_path, solar_recipe(layers="[0]").replace("./model", "org/name"))
        assert "if 'org/name' is a Hugging Face Hub repo" in run_fails(cli, r, 2)

    def test_tensor_missing_from_shard(self, cli, recipe_dir, model_copy):
        _shard(model_copy)
        index = json.loads((model_copy / "model.safetensors.index.json").read_text())
        index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00001." \
            "safetensors"
        (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
        err = run_fails(cli, solar(recipe_dir), 2)
        assert first_line(err).endswith(
            ": tensor `model.layers.9.mlp.up_proj.weight` is listed in "
            "model.safetensors.index.json for model-00001-of-00001.safetensors but that file does "
            "not contain it; the index is stale or the shard is from another checkpoint")

    def test_truncated_safetensors(self, cli, recipe_dir, model_copy):
        f = model_copy / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
        err = run_fails(cli, solar(recipe_dir), 2)  # header vs size: before any data is read
        assert "model/model.safetensors: file is truncated: tensor `" in first_line(err)
        assert first_line(err).endswith("; download or convert the checkpoint again")

    def test_header_length_beyond_file(self, cli, recipe_dir, model_copy):
        f = model_copy / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[:8] = struct.pack("<Q", len(data) * 2)
        f.write_bytes(bytes(data))
        err = run_fails(cli, solar(recipe_dir), 2)
        assert first_line(err).endswith(
            f"model/model.safetensors: header length {len(data) * 2} runs beyond the end of the "
            f"file ({len(data)} bytes); the file is truncated or not safetensors; download or "
            "convert it again")

    def test_unknown_dtype(self, cli, recipe_dir, model_copy):
        f = model_copy / "model.safetensors"
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = data[8:8 + n].replace(b'"F32"', b'"Q32"', 1)
        f.write_bytes(data[:8] + header + data[8 + n:])
        err = run_fails(cli, solar(recipe_dir), 2)
        assert "has unknown dtype 'Q32'; supported: BOOL, U8, I8" in first_line(err)

    def test_fp8_is_refused(self, cli, recipe_dir, model_copy):
        f = model_copy / "model.safetensors"
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["dtype"] = "F8_E4M3"
        header[name]["data_offsets"][1] = header[name]["data_offsets"][0] + (
            (header[name]["data_offsets"][1] - header[name]["data_offsets"][0]) // 4)
        # Keep the file consistent apart from the dtype: shrink only the header's claim.
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
        err = run_fails(cli, solar(recipe_dir), 2)
        assert "fp8 checkpoints are not supported in version 1" in first_line(err)

    def test_quantized_is_refused(self, cli, recipe_dir, model_copy):
        cfg = json.loads((model_copy / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
        (model_copy / "config.json").write_text(json.dumps(cfg))
        err = run_fails(cli, solar(recipe_dir), 2)
        assert "is a quantized checkpoint (quantization_config, quant_method 'bitsandbytes')" in err

    def test_pickle_only_is_refused(self, cli, recipe_dir, model_copy):
        (model_copy / "model.safetensors").unlink()
        (model_copy / "pytorch_model.bin").write_bytes(b"not loaded")
        err = run_fails(cli, solar(recipe_dir), 2)
        assert "holds only pickle weights (pytorch_model.bin); `run` does not load pickles" \
            in err

    def test_output_path_is_a_file(self, cli, recipe_dir):
        (recipe_dir / "out").write_text("not a directory")
        err = run_fails(cli, solar(recipe_dir), 2)
        assert first_line(err) == ("output path " + str(recipe_dir / "out") + " is a file; set "
                                   "`output.path` (or --output) to a directory")
        assert (recipe_dir / "out").read_text() == "not a directory"

    def test_bad_device(self, cli, recipe_dir):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        err = run_fails(cli, solar(recipe_dir), 2, "--device", "cuda")
        assert first_line(err) == ("--device cuda: CUDA is not available on this machine; use "
                                   "--device cpu (the default) or auto")
        assert not (recipe_dir / "out").exists()


def _shard(model: Path) -> None:
    """Turn a single-file checkpoint into a one-shard indexed checkpoint."""
    from recipekit.io.header import read_header

    f = model / "model.safetensors"
    names = list(read_header(f))
    shard = "model-00001-of-00001.safetensors"
    f.rename(model / shard)
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: shard for n in names}}))


def _damage(kind: str, model: Path) -> str:
    """Damage the tiny Llama at ``model`` one way; return what the message says."""
    f = model / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    if kind == "header":
        f.write_bytes(data[:8] + b"x" + data[9:])
        return "header is not valid JSON"
    if kind == "truncated":
        f.write_bytes(data[:-100])
        return "file is truncated: tensor"
    if kind == "dtype":
        f.write_bytes(data[:8] + data[8:8 + n].replace(b'"F32"', b'"Q32"', 1) + data[8 + n:])
        return "has unknown dtype 'Q32'"
    if kind == "config":
        (model / "config.json").write_text('{"model_type": ')
        return "config.json is not valid JSON"
    header = json.loads(data[8:8 + n])
    shard = "model-00001-of-00001.safetensors"
    f.rename(model / shard)
    weight_map = {t: shard for t in header if t != "__metadata__"}
    if kind == "index-escape":
        weight_map[next(iter(weight_map))] = "../secret.safetensors"
        (model.parent / "secret.safetensors").write_bytes(data)
        message = "../secret.safetensors"
    else:  # missing-shard
        weight_map[next(iter(weight_map))] = "model-00002-of-00002.safetensors"
        message = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return message


class TestExitCodeRule:
    """Issue 17 item 10 (DESIGN §4): exit 2 for everything `validate` can find — headers,
    config.json and indexes are read without any tensor data — from `validate`, `inspect` and
    `run` alike; exit 1 only for failures while reading or writing tensor data."""

    @pytest.mark.parametrize("command", ["validate", "inspect", "run"])
    @pytest.mark.parametrize("kind", ["header", "truncated", "dtype", "config", "index-escape",
                                      "missing-shard"])
    def test_found_before_tensor_data_is_exit_2(self, cli, recipe_dir, model_copy, kind,
                                                command):
        message = _damage(kind, model_copy)
        recipe = solar(recipe_dir)
        result = cli(command, model_copy if command == "inspect" else recipe)
        assert result.exit_code == 2, result.output
        assert message in result.stderr
        assert "Traceback" not in result.output and "internal error" not in result.output
        assert not (recipe_dir / "out").exists()

    def test_a_short_read_of_tensor_data_is_exit_1(self, tmp_path, tiny_llama):
        from recipekit.errors import TensorDataError
        from recipekit.io.header import read_header
        from recipekit.io.reader import FileReader

        f = tmp_path / "model.safetensors"
        f.write_bytes((tiny_llama / "model.safetensors").read_bytes())
        infos = sorted(read_header(f).values(), key=lambda i: i.offset)
        reader = FileReader()
        with open(f, "r+b") as fh:  # the file shrinks after its header was read
            fh.truncate(infos[-1].offset + 1)
        with pytest.raises(TensorDataError) as info:
            reader.read_tensor(infos[-1])
        assert info.value.exit_code == 1
        assert "while reading" in str(info.value)


#: A run in a subprocess whose second shard waits (a marker file says so) for a signal.
SLOW_SECOND_SHARD = """
import sys, time
from pathlib import Path
import recipekit.run.execute as ex
real, calls, marker = ex.write_shard, [], Path(sys.argv[1])
def slow(plan, shard, *a, **k):
    calls.append(shard.filename)
    if len(calls) == 2:
        marker.write_text("waiting")
        time.sleep(60)
    return real(plan, shard, *a, **k)
ex.write_shard = slow
sys.argv = ["recipekit", *sys.argv[2:]]
from recipekit.cli import main
main()
"""


class TestStopping:
    """How a command stops when it is told to, found by a black-box check of the CLI contract:
    SIGTERM (`timeout`, `docker stop`, Slurm) killed the process (no message, its temp file
    left, no JSON error event), `--debug` turned exit 2 into 1 and dropped the JSON error, a
    reader closing stdout (`| head -1`) was an "internal error", and a Ctrl-C while a JSON
    document was written left half of it before the error document."""

    def test_sigterm_stops_a_run_as_ctrl_c_does(self, tmp_path, model_copy):
        import os
        import signal
        import subprocess
        import sys
        import time

        from tests.helpers.recipes import ROOT

        recipe = write_recipe(tmp_path, solar_recipe(output="  path: ./out\n  shard_size: 100KB"))
        marker = tmp_path / "marker"
        proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_SECOND_SHARD, str(marker), "run", str(recipe),
             "--json", "-q"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "terminated (SIGTERM); finished shards are kept and a rerun resumes" in err
        last = json.loads(out.splitlines()[-1])
        assert last["event"] == "error" and last["type"] == "Interrupted"
        assert last["exit_code"] == 143
        assert not list((tmp_path / "out").glob("*.recipekit-partial"))
        state = json.loads((tmp_path / "out" / ".recipekit-state.json").read_text())
        assert len(state["finished"]) == 1

    def test_debug_adds_the_traceback_and_changes_nothing_else(self, cli, recipe_dir):
        recipe = solar(recipe_dir, '["range(0,9)"]')
        plain, debug = cli("run", recipe, "--json"), cli("run", recipe, "--json", "--debug")
        assert plain.exit_code == debug.exit_code == 2
        assert "Traceback" in debug.stderr and "Traceback" not in plain.stderr
        assert debug.stdout == plain.stdout and json.loads(debug.stdout)["event"] == "error"

    def test_a_closed_stdout_stops_quietly(self, tmp_path, model_copy):
        import subprocess
        import sys

        recipe = write_recipe(tmp_path, solar_recipe(output="  path: ./out\n  shard_size: 100KB"))
        proc = subprocess.Popen([sys.executable, "-m", "recipekit", "run", str(recipe), "--json"],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        json.loads(proc.stdout.readline())  # `| head -1`
        proc.stdout.close()
        err = proc.communicate(timeout=120)[1].decode()
        assert proc.returncode in (0, 1), err  # 0: it finished before the next event
        assert "internal error" not in err and "Traceback" not in err

    def test_ctrl_c_while_a_document_is_written_leaves_it_whole(self, cli, model_copy,
                                                               monkeypatch):
        import os
        import signal

        import typer

        echo = typer.echo

        def interrupted(text, *a, **k):
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the document is written
            echo(text, *a, **k)
        monkeypatch.setattr(typer, "echo", interrupted)
        result = cli("inspect", model_copy, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["tensors"]

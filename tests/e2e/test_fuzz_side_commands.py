"""Fuzzed inputs for the side commands and adapter configs (issue 17): `convert`, `lock`,
`import-mergekit`, `diff`, `verify` and `inspect` on damaged copies of real inputs exit 0, 1 or
2 with a message, never a traceback or "internal error", and write nothing but their own
output; a fuzzed adapter_config.json folds or is refused with exit 2 naming the file.

Strategies and the oracle: `tests/helpers/fuzz_side.py` (shared with `bench/fuzz_soak.py
--side`, which runs thousands of cases). CI runs a small derandomized sample (< 30 s).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.helpers.fuzz_side import (
    adapter_configs,
    check_adapter_fold,
    check_side,
    make_side_inputs,
    side_cases,
)

FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def side(tmp_path_factory, tiny_llama):
    from recipekit.cli import app

    root = tmp_path_factory.mktemp("side").resolve()
    return root, make_side_inputs(root / "inputs", tiny_llama), CliRunner(), app


@settings(max_examples=60, **FUZZ)
@given(data=st.data())
def test_side_commands_on_damaged_inputs(side, data):
    root, inputs, runner, app = side
    case = Path(tempfile.mkdtemp(dir=root))
    args, writes = data.draw(side_cases(inputs, case))
    event(f"{args[0]}: {check_side(runner, app, case, args, writes)}")


@settings(max_examples=25, **FUZZ)
@given(data=st.data())
def test_fuzzed_adapter_configs_fold_or_name_the_file(side, data):
    root, inputs, runner, app = side
    case = Path(tempfile.mkdtemp(dir=root))
    config = data.draw(adapter_configs(inputs))
    event(f"fold: {check_adapter_fold(runner, app, inputs, case, config, limit=5)}")


# ---------------------------------------------------------------------------------------------
# Bugs the fuzzer found, each fixed and pinned here: a null `r`, a `lora_alpha` past float range
# (exit 2 naming adapter_config.json), a NaN `layers_to_transform` (ignored: the file says what
# PEFT wrapped), an index entry longer than the file system allows (exit 2 naming it).

@pytest.mark.parametrize(("key", "value"), [("r", None), ("lora_alpha", 10**400),
                                            ("layers_to_transform", float("nan"))],
                         ids=["r-null", "lora_alpha-huge", "layers_to_transform-nan"])
def test_found_adapter_scalings(side, key, value):
    import json

    root, inputs, runner, app = side
    config = json.loads((inputs.adapter / "adapter_config.json").read_text())
    case = Path(tempfile.mkdtemp(dir=root))
    assert check_adapter_fold(runner, app, inputs, case, {**config, key: value}, limit=5) in (0, 2)


def test_found_convert_long_index_entry(side):
    root, inputs, runner, app = side
    case = Path(tempfile.mkdtemp(dir=root))
    src = case / "src"
    import shutil

    shutil.copytree(inputs.pickled, src)
    (src / "pytorch_model.bin.index.json").write_text('{"weight_map": {"a": "%s"}}' % ("x" * 5000))
    args = ["convert", "--allow-pickle", str(src), str(case / "dst")]
    assert check_side(runner, app, case, args, [case / "dst"]) in (0, 1, 2)

"""Reading an adapter set: hostile and invalid `rank_pattern`/`alpha_pattern` keys (issue 17
item 7).

Oracle: the located exit-2 message naming the adapter's config file and the key, within a time
bound; before the fix ``(.*.*)*q_projX`` made `validate` hang in `re.match` and an invalid regex
was silently skipped. Ordinary keys are checked against PEFT's `merge_and_unload` in
tests/steps/test_adapters.py (case ``pattern_keys_regex``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.helpers.adapter_builders import make_adapter
from tests.helpers.builders import make_model
from tests.helpers.recipes import write_recipe


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("adapterset")
    base = make_model("llama", d / "base", layers=2, seed=0)
    return base, make_adapter("llama", base, d / "lora", seed=1, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj"])


def _validate(cli, tmp_path: Path, base: Path, adapter: Path, field: str, key: str):
    config = json.loads((adapter / "adapter_config.json").read_text())
    config[field] = {key: 4}
    lora = tmp_path / "lora"
    lora.mkdir()
    for f in adapter.iterdir():
        (lora / f.name).write_bytes(f.read_bytes())
    (lora / "adapter_config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        models:
          base: {base}
        adapters:
          lora: ./lora
        steps:
          - name: folded
            op: adapters
            from: base
            adapters: [lora]
        output:
          path: ./out
        """)
    start = time.monotonic()
    result = cli("validate", recipe)
    return result, time.monotonic() - start


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_hostile_pattern_key_is_refused_quickly(cli, tmp_path, base_and_adapter, field):
    result, seconds = _validate(cli, tmp_path, *base_and_adapter, field, "(.*.*)*q_projX")
    assert seconds < 10
    assert result.exit_code == 2, result.output
    assert f"`{field}` key '(.*.*)*q_projX' in " in result.output
    assert "adapter_config.json" in result.output and "nests quantifiers" in result.output


def test_backtracking_key_without_nesting_is_matched_quickly(cli, tmp_path, base_and_adapter):
    result, seconds = _validate(cli, tmp_path, *base_and_adapter, "rank_pattern",
                                "(q|q|q|q)*_projX")
    assert seconds < 10
    assert result.exit_code == 0, result.output  # matches no module: r stays 4


@pytest.mark.parametrize(("key", "reason"), [
    ("(q_proj", "is not a valid regular expression"),
    (r"(q)\1_proj", "uses a backreference"),
])
def test_refused_pattern_key_is_located(cli, tmp_path, base_and_adapter, key, reason):
    result, _ = _validate(cli, tmp_path, *base_and_adapter, "rank_pattern", key)
    assert result.exit_code == 2, result.output
    assert "adapter_config.json" in result.output
    assert f"`rank_pattern` key {key!r}" in result.output
    assert reason in result.output

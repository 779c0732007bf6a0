"""Shared fixtures: tiny checkpoints built on the fly, recipe writing, and a CLI runner."""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from builders import make_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8-layer fp32 Llama (hidden 32, GQA, untied lm_head)."""
    return make_model("llama", tmp_path_factory.mktemp("llama") / "model", layers=8, seed=0)


@pytest.fixture(scope="session")
def tiny_llama_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second Llama of the same shapes, different weights."""
    return make_model("llama", tmp_path_factory.mktemp("llama_b") / "model", layers=8, seed=1)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8-layer fp32 Mistral (GQA, sliding window, untied lm_head)."""
    return make_model("mistral", tmp_path_factory.mktemp("mistral") / "model", layers=8, seed=2)


@pytest.fixture
def model_copy(tmp_path: Path, tiny_llama: Path) -> Path:
    """A private copy of the tiny Llama that a test may damage."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_llama, dst)
    return dst


def solar_recipe(model: str | Path = "./model", layers: str = '["range(0,6)", "range(2,8)"]',
                 output: str | None = "  path: ./out") -> str:
    """The SOLAR-style recipe most tests start from (8 -> 12 layers of model `tiny`).

    ``output`` holds the lines under ``output:`` (None: no output section). Line numbers are
    stable: `layers` is on line 8, `output` on line 9.
    """
    text = (f"recipekit: 1\nmodels:\n  tiny: {model}\nsteps:\n  - name: up\n    op: layers\n"
            f"    from: tiny\n    layers: {layers}\n")
    return text if output is None else text + f"output:\n{output}\n"


def read_tensors(directory: Path) -> dict:
    """Every tensor of a checkpoint directory (all its safetensors files), by name."""
    from safetensors import safe_open

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118
    return out


def write_recipe(directory: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@pytest.fixture
def cli():
    """Invoke the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from recipekit.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.fixture
def hub_cache(tmp_path, tiny_llama, monkeypatch):
    """An offline huggingface_hub cache holding `tiny_llama` as repo org/tiny (test_hub.py)."""
    from test_hub import add_to_cache

    cache = tmp_path / "hub-cache"
    add_to_cache(cache, "org/tiny", {p.name: p for p in tiny_llama.iterdir()})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache

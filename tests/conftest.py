"""Shared fixtures: tiny checkpoints built on the fly, a CLI runner and a fake hub cache.

Plain helpers (recipes, builders, the hub cache layout) live in `tests.helpers`, which test
modules import by name; this file holds only fixtures."""

from __future__ import annotations

import os

# before any import that may import huggingface_hub, which reads them once, at its import
# (the builders import it: set after them, a hub test tried the network and waited ~45 s on
# its retries before falling back to the cache)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from tests.helpers.builders import make_model  # noqa: E402


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
    """An offline huggingface_hub cache holding `tiny_llama` as repo org/tiny (helpers.hub)."""
    from tests.helpers.hub import add_to_cache

    cache = tmp_path / "hub-cache"
    add_to_cache(cache, "org/tiny", {p.name: p for p in tiny_llama.iterdir()})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mergekit's picoLLaVA shape (2 text and 2 vision layers), fp32, seeded."""
    from tests.helpers.vlm import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("llava") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_llava_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second picoLLaVA, other weights."""
    from tests.helpers.vlm import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("llava_b") / "model", seed=1)

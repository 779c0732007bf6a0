"""Running mergekit 0.1.5 from its side venv (bench/setup_mergekit.sh), for tests that compare
recipekit with it live (marker `mergekit`, skipped without the venv)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers.builders import read_tensors
from tests.helpers.recipes import ROOT

MERGEKIT_VENV = Path(os.environ.get("RECIPEKIT_MERGEKIT_VENV", ROOT / "bench" / ".venv-mergekit"))
MERGEKIT_PYTHON = MERGEKIT_VENV / "bin" / "python"
needs_mergekit = pytest.mark.skipif(
    not MERGEKIT_PYTHON.exists(),
    reason="no mergekit side venv (bash bench/setup_mergekit.sh, or set RECIPEKIT_MERGEKIT_VENV)")


def run_mergekit(config: Path, out: Path, cwd: Path, *extra: str) -> dict:
    """mergekit-yaml ``config`` into ``out`` (model paths relative to ``cwd``, as mergekit
    resolves them), offline, on the CPU; every output tensor by name."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0",
               CUDA_VISIBLE_DEVICES="")
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(MERGEKIT_VENV / "bin" / "mergekit-yaml"), str(config), str(out),
                           "--no-write-model-card", *extra], cwd=cwd, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"mergekit failed on {config}:\n{done.stderr[-3000:]}")
    return read_tensors(out)

#!/usr/bin/env bash
# Create the side venv with mergekit 0.1.5 used by bench/run.py (and by tests marked `mergekit`).
#
# Why a side venv: mergekit pins its own transformers/accelerate/pydantic ranges and pulls in a
# large data stack (datasets, pyarrow, pandas); keeping it apart leaves recipekit's environment
# as users have it. torch is installed FIRST and pinned to 2.13.0 so pip takes the CPU wheel
# that lies on local disk; if mergekit were installed first, its `torch>=2.0` requirement
# could pull a multi-GB CUDA build from the index.
#
# Usage: bash bench/setup_mergekit.sh          (idempotent; re-running only re-checks)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv="$here/.venv-mergekit"
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)

# 1. torch first, CPU build only. The local find-links serve torch-2.13.0+cpu, and a local
#    version label sorts above the bare 2.13.0 of the index, so pip takes it; anything else is
#    refused below so a CUDA build never stays in the venv.
"${pip[@]}" "torch==2.13.0"
torch_version=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
case "$torch_version" in
    *+cpu) ;;
    *) echo "setup_mergekit.sh: expected a CPU torch build, got $torch_version" >&2; exit 1 ;;
esac

# 2. mergekit, with torch held at the version just installed.
constraint=$(mktemp)
trap 'rm -f "$constraint"' EXIT
echo "torch==$torch_version" >"$constraint"
"${pip[@]}" -c "$constraint" "mergekit==0.1.5"

"$venv/bin/python" - <<'PY'
from importlib.metadata import version
import torch
print(f"mergekit {version('mergekit')}, torch {torch.__version__}, "
      f"transformers {version('transformers')}")
PY
echo "mergekit-yaml: $venv/bin/mergekit-yaml"

#!/usr/bin/env bash
# On a GPU machine with torch (and no install of recipekit): the CUDA tests, then the
# benchmark with `--device cuda` beside the CPU run. Logs and tables go to $OUT (or
# bench/results). Usage: bash bench/gpu.sh [tests] [startup] [bench CASES [RUNS]] ...
# SKIP: the variants to leave out (default: recipekit --no-fsync).
#
# Packages torch does not bring can travel as wheels in ./.whl (jsonschema and its three
# dependencies for Python 3.12); they are installed to /tmp/site, not into the system.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PWD:/tmp/site"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(),
torch.get_num_threads(), 'CPU threads')" || exit 1
status=0
while [ $# -gt 0 ]; do
    case "$1" in
        tests)
            python3 -m pytest -q -p no:cacheprovider tests/e2e/test_cuda.py 2>&1 \
                | tee "$OUT/test_cuda.log" | tail -25 || status=1
            shift ;;
        startup)  # what every computed run pays before its first byte
            python3 -c "import time; t = time.perf_counter(); import torch
a = time.perf_counter(); torch.zeros(1, device='cuda'); torch.cuda.synchronize()
print(f'import torch {a - t:.2f} s, CUDA context {time.perf_counter() - a:.2f} s')"
            shift ;;
        bench)
            python3 bench/run.py --device cuda --cases "$2" --runs "${3:-2}" \
                --skip-variants "${SKIP:-recipekit --no-fsync}" 2>&1 | tee "$OUT/bench-${2//,/-}.log" || status=1
            cp bench/results/latest.md "$OUT/bench-${2//,/-}.md" 2>/dev/null
            shift 2
            [[ "${1:-}" =~ ^[0-9]+$ ]] && shift ;;
        *) echo "unknown stage $1" >&2; exit 2 ;;
    esac
done
exit $status

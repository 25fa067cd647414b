#!/usr/bin/env bash
# The GPU check in one call on a bare NVIDIA machine (torch, torchvision, numpy, PIL, click there; no network).
# Here, once:   bash tools/fetch_gpu_wheels.sh        (zarr, numcodecs, webdataset, nvImageCodec wheels into .whl/)
# Device call:  run(command="GPU_PYTEST=1 bash tools/gpu_check.sh --profile", carry=[".whl"], timeout_s=480)
# Figures land in $OUT/gpu_check.json; a table is printed last; GPU_PYTEST=1 then runs `pytest -m gpu`.
# On a CPU: bash tools/gpu_check.sh --quick
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"  # the interpreter with torch (a venv's, in tests)
if [ -d .whl ] && ! "$PYTHON" -c "import zarr" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kdpipe-site .whl/*.whl
  export PYTHONPATH="/tmp/kdpipe-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" tools/gpu_check.py --out "${OUT:-gpu_check_out}" "$@"
if [ "${GPU_PYTEST:-0}" = 1 ]; then
  "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/
fi

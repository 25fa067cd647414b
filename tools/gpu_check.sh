#!/usr/bin/env bash
# The GPU check in one call on a bare NVIDIA machine (torch, torchvision, numpy, PIL, click there; no network).
# Here, once:   bash tools/fetch_gpu_wheels.sh        (zarr, numcodecs, webdataset wheels into .whl/, git-ignored)
# Device call:  run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Figures land in $OUT/gpu_check.json; a short table is printed last. On a CPU: bash tools/gpu_check.sh --quick
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"  # the interpreter with torch (a venv's, in tests)
if [ -d .whl ] && ! "$PYTHON" -c "import zarr" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kdpipe-site .whl/*.whl
  export PYTHONPATH="/tmp/kdpipe-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PYTHON" tools/gpu_check.py --out "${OUT:-gpu_check_out}" "$@"

#!/usr/bin/env bash
# Download the small wheels the GPU machine lacks (Python 3.12 there; no network there) into .whl/
# (git-ignored), so `run` can carry them: carry=[".whl"]. zarr and its needs for the teacher cache,
# webdataset for the readback path, nvImageCodec (25 MB) for the CPU workers' ROI decode and, with nvJPEG's
# library for CUDA 13.0 (4 MB; the machine's torch is cu130), for decode_device cuda-hw (the GPU's JPEG engines).
# DALI (199+ MB) is too large for one call: tools/carry_dali.py sends it in parts.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pkg in zarr==3.1.6 numcodecs==0.16.6 donfig google-crc32c webdataset==1.0.2 braceexpand \
           nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.0.4.44; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl "$pkg"
done
ls -la .whl

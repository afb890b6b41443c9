#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels that the GPU machine lacks: Python 3.12,
# manylinux x86_64, no dependencies (torch, torchvision, timm, numpy, tabulate, tensorboard,
# huggingface_hub, safetensors, tqdm, scipy, scikit-learn and Cython are installed there).
# tools/perf/gpu_benchmark.sh installs them there into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.whl
mkdir -p "$DEST"
PY=${PYTHON:-python3}

# Pure-Python wheels.
PURE=(open_clip_torch==3.3.0 fastreid==1.4.0 yacs==0.1.8 termcolor==3.3.0 ftfy==6.3.1)
# Compiled wheels: CPython 3.12, manylinux x86_64 (wcwidth, needed by ftfy, ships compiled too).
BINARY=(regex==2026.11.19 wcwidth==0.9.4 faiss-cpu==1.15.1)

DOWNLOAD=("$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12)
"${DOWNLOAD[@]}" -d "$DEST" "${PURE[@]}"
"${DOWNLOAD[@]}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" "${BINARY[@]}"

ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1

#!/usr/bin/env bash
# Sets up a fresh machine of this project's kind: a virtual environment in .venv with torch, torchvision and the
# test/tool dependencies, then builds and installs fasterrcnn_ext into it (editable).
#
#   FORCE_CUDA=1              also compile the CUDA kernels with no GPU present (CI does)
#   TORCH_CUDA_ARCH_LIST=9.0  narrow the GPU architectures to compile (default: 7.5 to 9.0 plus PTX)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip
# torch and torchvision: the releases this machine kind serves from local disk (a CUDA 13.0 build).
$PIP install --quiet "torch==2.14.1" "torchvision==0.29.1"
# The runtime dependencies beyond torch (pyproject.toml lists them too; the build below uses --no-deps so that pip
# never swaps the torch above for another release).
$PIP install --quiet "numpy" "pillow" "tqdm>=4.60" "pycocotools>=2.0.7"
$PIP install --quiet -r requirements-dev.txt
MAX_JOBS=${MAX_JOBS:-2} $PIP install --no-build-isolation --no-deps -e .
.venv/bin/python -c "import fasterrcnn_ext, json; print(json.dumps(fasterrcnn_ext.build_info()))"

#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU, nvcc and a preinstalled torch (2.11 or newer), and no network:
#   1. builds fasterrcnn_ext with the CUDA kernels against the preinstalled torch (--no-build-isolation, offline);
#   2. runs the whole test suite (tests parametrised over cpu and cuda run on both);
#   3. runs compute-sanitizer memcheck on the op tests' CUDA cases;
#   4. runs the benchmarks on CUDA (and on the CPU for reference).
# Logs and JSON go to one folder: $1, else $OUT, else gpu_check_out/. Exits non-zero if the build or tests fail.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0

{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi || true
  nvcc --version || true
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(), 'torchvision', torchvision.__version__)"
} > "$DIR/env.txt" 2>&1
cat "$DIR/env.txt"

# Python packages the GPU image lacks (pycocotools, for the COCO evaluation tests) travel as wheels in .whl/
# (see the device tool's README: pip download --only-binary=:all: --python-version 3.12 ... -d .whl pycocotools);
# without them those tests skip.
if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== build"
if ! FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps --no-index -e . \
    > "$DIR/build.log" 2>&1; then
  echo "pip install failed; trying an in-place build" | tee -a "$DIR/build.log"
  FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace >> "$DIR/build.log" 2>&1 || {
    tail -40 "$DIR/build.log"; exit 1; }
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c "import fasterrcnn_ext, json; info = fasterrcnn_ext.build_info(); print(json.dumps(info)); \
assert info['cuda'], 'CUDA kernels missing'" | tee "$DIR/build_info.json" || exit 1

echo "== tests"
$PY -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$DIR/tests.log" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== compute-sanitizer memcheck (op tests, CUDA cases)"
compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -p no:cacheprovider tests/ops -k cuda -x \
  > "$DIR/memcheck.log" 2>&1
echo "memcheck exit code $? (0: clean)" | tee -a "$DIR/memcheck.log"
tail -5 "$DIR/memcheck.log"

echo "== benchmarks"
$PY benchmarks/run.py --device cuda --json "$DIR/bench_cuda.json" 2>&1 | tee "$DIR/bench_cuda.txt"
$PY benchmarks/run.py --device cpu --threads 2 --quick --json "$DIR/bench_cpu.json" > "$DIR/bench_cpu.txt" 2>&1
exit $status

#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU, nvcc and a preinstalled torch (2.11 or newer), and no network:
#   1. builds fasterrcnn_ext with the CUDA kernels against the preinstalled torch (--no-build-isolation, offline);
#   2. runs scripts/cuda_smoke.py: each CUDA op once against torchvision, stopping at a hung kernel;
#   3. runs the whole test suite (tests parametrised over cpu and cuda run on both);
#   4. runs the benchmarks on CUDA (and on the CPU for reference);
#   5. runs compute-sanitizer memcheck on the op tests' CUDA cases (slowest, so last).
# On a 16-core H100 machine: build ~60 s, smoke ~10 s, op tests on CUDA ~40 s, `--quick` CUDA benchmarks ~3 min.
# Logs and JSON go to one folder: $1, else $OUT, else gpu_check_out/. Exits non-zero if the build or tests fail.
# STEPS picks steps (default "build smoke tests bench memcheck"): the device tool stops a command after 10 minutes
# and a cold machine needs the build again, so run e.g. STEPS="build smoke tests", then STEPS="build bench".
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0
STEPS=" ${STEPS:-build smoke tests bench memcheck} "
want() { [[ "$STEPS" == *" $1 "* ]]; }

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

if want build; then
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
fi

if want smoke; then
  echo "== smoke (every CUDA op once against torchvision, with a watchdog for hung kernels)"
  $PY scripts/cuda_smoke.py --timeout 30 2>&1 | tee "$DIR/smoke.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "smoke failed: see $DIR/smoke.log"; exit 1; }
fi

if want tests; then
  echo "== tests"
  # pytest-timeout and pytest-xdist are in the GPU image; without them the tests run serially with no time limit.
  extra=()
  $PY -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 120)
  $PY -c "import xdist" 2>/dev/null && extra+=(-n 8)
  $PY -m pytest -q -rfE -p no:cacheprovider "${extra[@]}" tests 2>&1 | tee "$DIR/tests.log" | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want bench; then
  echo "== benchmarks"
  # bench_cuda.md: the table to paste into BENCHMARKS.md ("CUDA"), with device, date and commit.
  $PY benchmarks/run.py --device cuda --json "$DIR/bench_cuda.json" --markdown "$DIR/bench_cuda.md" 2>&1 | \
    tee "$DIR/bench_cuda.txt"
  # Where the time goes on each side, per case (kernels per call, the largest): the starting point of CUDA work.
  $PY benchmarks/run.py --device cuda --quick --profile > "$DIR/bench_cuda_profile.txt" 2>&1
  $PY benchmarks/run.py --device cpu --threads 2 --quick --json "$DIR/bench_cpu.json" > "$DIR/bench_cpu.txt" 2>&1
fi

if want memcheck; then
  echo "== compute-sanitizer memcheck (op tests, CUDA cases)"
  compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -p no:cacheprovider tests/ops -k cuda -x \
    > "$DIR/memcheck.log" 2>&1
  echo "memcheck exit code $? (0: clean)" | tee -a "$DIR/memcheck.log"
  tail -5 "$DIR/memcheck.log"
  # The property-based cases (tests/ops/test_properties.py draw the device: CPU and CUDA), a short profile.
  echo "== compute-sanitizer memcheck (property-based cases, HYPOTHESIS_PROFILE=short)"
  HYPOTHESIS_PROFILE=short compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -p no:cacheprovider \
    tests/ops/test_properties.py -x > "$DIR/memcheck_properties.log" 2>&1
  echo "memcheck (properties) exit code $? (0: clean)" | tee -a "$DIR/memcheck_properties.log"
  tail -5 "$DIR/memcheck_properties.log"
fi

exit $status

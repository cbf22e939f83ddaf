#!/usr/bin/env bash
# The GPU check: ONE command for a lent GPU machine (H100/H200, nvcc, a preinstalled torch 2.11 or newer, no network),
# sized for the device tool (10 minutes a command, 15 minutes of device time in all). Every step runs under `timeout`
# and the whole stays within a budget (BUDGET_S, default 510 s): a step that would start with too little time left
# is skipped and said so. Results and logs go to one folder: $1, else $OUT, else gpu_check_out/.
#
#   bash scripts/gpu_check.sh                  # build, smoke, cuda tests, sanitizers, sync audit, quick benchmarks
#   STEPS="build bench_full" bash scripts/gpu_check.sh   # the optional second command: the full CUDA benchmarks
#
# Steps (expected time on an H200 with 16 cores):
#   build      fasterrcnn_ext for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0), in place, offline          ~90 s
#   smoke      scripts/cuda_smoke.py: each CUDA op once against torchvision, with a watchdog        ~15 s
#   tests      pytest tests/ops tests/models -k cuda, a per-test timeout when pytest-timeout is there ~60 s
#              (tests/models/test_cuda_graph.py: the CUDA graph capture and replays of the detector)
#   racecheck, synccheck, initcheck   compute-sanitizer on the smoke (the shared-memory kernels)  ~40 s each
#   memcheck   compute-sanitizer memcheck on the property-based cases (HYPOTHESIS_PROFILE=short)  ~60 s
#   audit      scripts/cuda_sync_audit.py: where each op and the eval forward wait for the device   ~20 s
#   bench      benchmarks/run.py --device cuda --quick --only nms roi detector                     ~90 s
#   bench_full the full CUDA benchmarks, with --profile (not in the default steps)
# Exit status: non-zero if the build, the smoke, the tests or a sanitizer fails.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
STEPS=" ${STEPS:-build smoke tests racecheck synccheck initcheck memcheck audit bench} "
BUDGET_S=${BUDGET_S:-510}
START=$(date +%s)
status=0
want() { [[ "$STEPS" == *" $1 "* ]]; }

# step NAME CAP_S COMMAND...: runs COMMAND under `timeout` (its cap, or what is left of the budget if less), its
# output in $DIR/NAME.log (the last lines shown); skips it when under 15 s would be left.
step() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if [ "$left" -lt 15 ]; then
    echo "== $name: SKIPPED (${left} s of the ${BUDGET_S} s budget left)" | tee -a "$DIR/summary.txt"
    return 0
  fi
  local limit=$(( cap < left ? cap : left ))
  echo "== $name (at most ${limit} s)"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$DIR/$name.log" 2>&1
  local rc=$?
  tail -${TAIL:-12} "$DIR/$name.log"
  local verdict="ok"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="TIMED OUT"
  [ "$rc" -ne 0 ] && [ "$verdict" = ok ] && verdict="FAILED (exit $rc)"
  echo "== $name: $verdict in $(( $(date +%s) - t0 )) s" | tee -a "$DIR/summary.txt"
  return "$rc"
}

{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  nvcc --version | tail -2 || true
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(), 'torchvision', torchvision.__version__)"
} > "$DIR/env.txt" 2>&1
cat "$DIR/env.txt"
: > "$DIR/summary.txt"

# Python packages the GPU image lacks (pycocotools, ...) travel as wheels in .whl/ (see the device tool's README:
# pip download --only-binary=:all: --python-version 3.12 ... -d .whl NAME); without them those tests skip.
if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build below

if want build; then
  step build 300 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    $PY setup.py build_ext --inplace || { echo "build failed: see $DIR/build.log"; exit 1; }
  $PY -c "import fasterrcnn_ext, json; info = fasterrcnn_ext.build_info(); print(json.dumps(info)); \
assert info['cuda'], 'CUDA kernels missing'" | tee "$DIR/build_info.json" || exit 1
fi

if want smoke; then
  step smoke 90 $PY scripts/cuda_smoke.py --timeout 30 || { echo "smoke failed: see $DIR/smoke.log"; exit 1; }
fi

if want tests; then
  # A hung kernel must not eat the budget: pytest-timeout (in the GPU image) interrupts a test after 60 s.
  extra=()
  $PY -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 60)
  TAIL=25 step tests 200 $PY -m pytest -q -rfE -p no:cacheprovider "${extra[@]}" tests/ops tests/models -k cuda \
    || status=1
fi

# compute-sanitizer on the smoke: racecheck and synccheck for the shared-memory kernels (the NMS walk, the RoIAlign
# sample table), initcheck for reads of uninitialised device memory.
for tool in racecheck synccheck initcheck; do
  if want "$tool"; then
    step "$tool" 90 compute-sanitizer --tool "$tool" --error-exitcode 9 $PY scripts/cuda_smoke.py --timeout 60 \
      || status=1
  fi
done

if want memcheck; then
  step memcheck 120 env HYPOTHESIS_PROFILE=short compute-sanitizer --tool memcheck --error-exitcode 9 \
    $PY -m pytest -q -p no:cacheprovider -x tests/ops/test_properties.py || status=1
fi

if want audit; then
  TAIL=15 step audit 60 $PY scripts/cuda_sync_audit.py --json "$DIR/sync_audit.json"
fi

if want bench; then
  # bench_cuda.md: the table to paste into BENCHMARKS.md ("CUDA"), with device, date and commit.
  TAIL=25 step bench 150 $PY benchmarks/run.py --device cuda --quick --only nms roi detector \
    --json "$DIR/bench_cuda.json" --markdown "$DIR/bench_cuda.md"
fi

if want bench_full; then
  TAIL=40 step bench_full 420 $PY benchmarks/run.py --device cuda --json "$DIR/bench_cuda_full.json" \
    --markdown "$DIR/bench_cuda_full.md" --profile
fi

echo "== summary ($(( $(date +%s) - START )) s)"
cat "$DIR/summary.txt"
exit $status

#!/usr/bin/env bash
# The GPU check: ONE command for a lent GPU machine (H100/H200, nvcc, a preinstalled torch 2.11 or newer, no network),
# sized for the device tool (10 minutes a command, 15 minutes of device time in all). Every step runs under `timeout`
# at its cap, and the caps of the default steps sum to at most 80% of the budget (BUDGET_S, default 510 s), so every
# step gets its whole cap; a step that would start with under 15 s of the budget left is skipped and said so. Results
# and logs go to one folder: $1, else $OUT, else gpu_check_out/.
#
#   bash scripts/gpu_check.sh                  # the default steps below
#   STEPS="build bench_full" bash scripts/gpu_check.sh   # the optional second command: the full CUDA benchmarks
#   bash scripts/gpu_check.sh --plan           # runs nothing: each step's cap, their sum, the tests step's test ids
#   bash scripts/gpu_check.sh --fetch-wheels   # on a machine with network: what the GPU image may lack, into .whl/
#
# Steps (default), their caps in seconds (CAP below; tests/test_gpu_check_plan.py checks this table against it):
#   build        130  fasterrcnn_ext for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0), in place, offline
#   smoke         30  scripts/cuda_smoke.py: each CUDA op once against torchvision, and a CUDA graph capture of
#                     fasterrcnn_tiny, with a watchdog (a 592 MB RoIAlign output among them)
#   tests         90  pytest -m cuda tests/ops tests/models: the tests that need a GPU, and only those (the `cuda`
#                     marker, tests/conftest.py), 30 s a test when pytest-timeout is there
#   racecheck     25  compute-sanitizer on scripts/cuda_smoke.py --quick (small cases: each op and the capture)
#   synccheck     20  the same
#   initcheck     20  the same, without PyTorch's caching allocator (PYTORCH_NO_CUDA_MEMORY_CACHING=1), whose reused
#                     blocks read as initialised; without it no capture can run: the smoke skips the capture
#   memcheck      40  compute-sanitizer memcheck on tests/ops/test_properties.py (HYPOTHESIS_PROFILE=short), without
#                     the caching allocator, inside whose blocks an access past a tensor's end goes unseen; SKIPPED,
#                     loudly, where hypothesis is missing
#   audit         15  scripts/cuda_sync_audit.py: where each op and the eval forward wait for the device
#   bench         35  benchmarks/run.py --device cuda --quick --only nms roi detector
#   sum          405  of the 510 s budget: 79% (at most 408, 80%); a step still running at its cap is killed
#                     10 s later at most, so even then the steps end within 495 s
# Not a default step:
#   bench_full   420  the full CUDA benchmarks, with --profile
#
# Each step ends as ok, FAILED (its command's own non-zero exit: a wrong result, a crash, a sanitizer's report, a
# watchdog; or a pytest step in which no test passed), TIMED OUT (cut at its cap: inconclusive, the rest goes on) or
# SKIPPED (with the reason). The script prints one table of step, status and seconds (also $DIR/summary.txt) and
# exits 1 if a step FAILED or the build did not finish, else 0.
#
# Python packages the GPU image lacks travel as wheels in .whl/ (git-ignored; name `.whl` in the device tool's
# `carry`), which this script installs first: `--fetch-wheels` downloads hypothesis and its one dependency there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEPS=" ${STEPS:-build smoke tests racecheck synccheck initcheck memcheck audit bench} "
BUDGET_S=${BUDGET_S:-510}
declare -A CAP=([build]=130 [smoke]=30 [tests]=90 [racecheck]=25 [synccheck]=20 [initcheck]=20 [memcheck]=40
                [audit]=15 [bench]=35 [bench_full]=420)
ORDER=(build smoke tests racecheck synccheck initcheck memcheck audit bench bench_full)
TEST_SELECTION=(-m cuda tests/ops tests/models)
want() { [[ "$STEPS" == *" $1 "* ]]; }

if [ "${1:-}" = "--fetch-wheels" ]; then
  # Wheels for the GPU image's Python (3.12, x86-64); one version of each, since pip refuses two of one package.
  exec $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl "hypothesis==6.170.29" "sortedcontainers==2.4.0"
fi

if [ "${1:-}" = "--plan" ]; then
  total=0
  echo "budget $BUDGET_S"
  for name in "${ORDER[@]}"; do
    if want "$name"; then echo "cap $name ${CAP[$name]}"; total=$(( total + CAP[$name] )); fi
  done
  echo "caps $total"
  if want tests; then
    echo "selection ${TEST_SELECTION[*]}"
    $PY -m pytest --collect-only -q -p no:cacheprovider "${TEST_SELECTION[@]}" | sed -n 's/^\(tests\/.*::.*\)$/test \1/p'
    exit "${PIPESTATUS[0]}"
  fi
  exit 0
fi

DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$DIR"
export PYTHONUNBUFFERED=1
START=$(date +%s)
status=0
: > "$DIR/summary.txt"

# record NAME STATUS SECONDS: one row of the summary table.
record() { printf '%-11s %-46s %5s\n' "$1" "$2" "$3" >> "$DIR/summary.txt"; echo "== $1: $2 (${3} s)"; }

summary() {
  echo "== summary: $(( $(date +%s) - START )) s of the ${BUDGET_S} s budget"
  printf '%-11s %-46s %5s\n' step status seconds
  cat "$DIR/summary.txt"
}

# step NAME COMMAND...: runs COMMAND under `timeout` at NAME's cap (or what is left of the budget, if less), its
# output in $DIR/NAME.log (the last lines shown). Returns 0 unless the command failed by itself; LAST is the status.
step() {
  local name=$1; shift
  local cap=${CAP[$name]}
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if [ "$left" -lt 15 ]; then
    LAST=SKIPPED; record "$name" "SKIPPED (${left} s of the budget left)" 0
    return 0
  fi
  local limit=$(( cap < left ? cap : left ))
  echo "== $name (at most ${limit} s)"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$DIR/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  tail -"${TAIL:-12}" "$DIR/$name.log"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    LAST=TIMED_OUT; record "$name" "TIMED OUT at ${limit} s (inconclusive)" "$took"
    return 0
  elif [ "$rc" -ne 0 ]; then
    LAST=FAILED; record "$name" "FAILED (exit $rc)" "$took"
    return 1
  elif [ -n "${PYTEST_STEP:-}" ] && ! grep -Eq '[0-9]+ passed' "$DIR/$name.log"; then
    LAST=FAILED; record "$name" "FAILED (no test passed)" "$took"  # a skipped module reports success
    return 1
  fi
  LAST=ok; record "$name" ok "$took"
  return 0
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

if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build below

if want build; then
  step build env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    $PY setup.py build_ext --inplace
  if [ "$LAST" != ok ] || ! $PY -c "import fasterrcnn_ext, json; info = fasterrcnn_ext.build_info(); \
print(json.dumps(info)); assert info['cuda'], 'CUDA kernels missing'" > "$DIR/build_info.json" 2>&1; then
    cat "$DIR/build_info.json" 2>/dev/null
    echo "the build did not finish with the CUDA kernels: see $DIR/build.log"
    summary
    exit 1
  fi
  cat "$DIR/build_info.json"
fi

if want smoke; then
  step smoke $PY scripts/cuda_smoke.py --timeout 20 || status=1
fi

if want tests; then
  # A hung kernel must not eat the budget: pytest-timeout (in the GPU image) fails a test after 30 s.
  extra=()
  $PY -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 30)
  TAIL=25 PYTEST_STEP=1 step tests $PY -m pytest -q -rfEs -p no:cacheprovider "${extra[@]}" "${TEST_SELECTION[@]}" \
    || status=1
fi

# compute-sanitizer on the quick smoke: racecheck and synccheck for the shared-memory kernels (the NMS walk, the
# RoIAlign sample table), initcheck for reads of uninitialised device memory.
for tool in racecheck synccheck initcheck; do
  if want "$tool"; then
    uncached=()
    [ "$tool" = initcheck ] && uncached=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    step "$tool" env "${uncached[@]}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      $PY scripts/cuda_smoke.py --quick --timeout 20 || status=1
  fi
done

if want memcheck; then
  if $PY -c "import hypothesis" 2>/dev/null; then
    PYTEST_STEP=1 step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 HYPOTHESIS_PROFILE=short \
      compute-sanitizer --tool memcheck --error-exitcode 9 \
      $PY -m pytest -q -rs -p no:cacheprovider -x tests/ops/test_properties.py || status=1
  else
    echo "!! memcheck SKIPPED: hypothesis is not installed here. Fetch it where there is network with"
    echo "!!   bash scripts/gpu_check.sh --fetch-wheels   and carry .whl to this machine"
    record memcheck "SKIPPED (no hypothesis: see --fetch-wheels)" 0
  fi
fi

if want audit; then
  TAIL=15 step audit $PY scripts/cuda_sync_audit.py --json "$DIR/sync_audit.json" || status=1
fi

if want bench; then
  # bench_cuda.md: the table to paste into BENCHMARKS.md ("CUDA"), with device, date and commit.
  TAIL=25 step bench $PY benchmarks/run.py --device cuda --quick --only nms roi detector \
    --json "$DIR/bench_cuda.json" --markdown "$DIR/bench_cuda.md" || status=1
fi

if want bench_full; then
  TAIL=40 step bench_full $PY benchmarks/run.py --device cuda --json "$DIR/bench_cuda_full.json" \
    --markdown "$DIR/bench_cuda_full.md" --profile || status=1
fi

summary
exit $status

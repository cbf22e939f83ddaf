#!/usr/bin/env bash
# Runs the op and model tests against an AddressSanitizer + UndefinedBehaviorSanitizer build of the C++ kernels.
#
#   bash scripts/sanitize.sh                 # the default build: the AVX-512 code where this CPU has it, else AVX2
#   ISA=avx2 bash scripts/sanitize.sh        # FRCNN_CPU_MAX_ISA=avx2: the AVX2 code, even on an AVX-512 CPU
#   TWIN=1 bash scripts/sanitize.sh          # the hand-written AVX-512 kernels replaced by their CPU twins (SIMDe's
#                                            # portable intrinsics, FRCNN_USE_AVX512_TWIN=1): their source checked
#                                            # on any CPU, AVX-512 or not
#   bash scripts/sanitize.sh tests/ops -k roi_pool     # other pytest arguments (default: tests/ops tests/models)
#   DRY_RUN=1 bash scripts/sanitize.sh       # say what would be built and run, and stop (tests/test_sanitize_script.py)
#
# The build lives in its own copy of the tree (build/sanitize-<isa>/, rebuilt incrementally), so the .venv's
# editable install is untouched. libasan is preloaded into Python (the interpreter is not instrumented). The first
# memory error or undefined behaviour stops the process that meets it.
#
# The verdict does not come from exit statuses: every sanitizer report (of pytest and of the Python processes the
# tests start) goes to build/sanitize-<isa>/report.<pid>, and a process stopped by a sanitizer exits with status 0
# (LeakSanitizer's exitcode=0, which ASan and UBSan share, so that leaks at exit do not fail a run). The run is clean
# when pytest finished (its JUnit report exists) with no failure, and no report holds an error.
#
# Leaks: LeakSanitizer runs at exit and reports every block still allocated, most of them Python's and torch's own
# (interned objects, caches freed by nobody at exit). Only leaks with a frame in our library count: the script
# keeps those reports (build/sanitize-<isa>/leaks.txt has them all) and fails if there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY="$ROOT/.venv/bin/python"
ISA=${ISA:-default}
case "$ISA" in default) isa_env=() ;; avx2) isa_env=(FRCNN_CPU_MAX_ISA=avx2) ;;
  *) echo "ISA must be 'default' or 'avx2', got '$ISA'" >&2; exit 2 ;; esac
TWIN=${TWIN:-0}
case "$TWIN" in 0|1) ;; *) echo "TWIN must be 0 or 1, got '$TWIN'" >&2; exit 2 ;; esac
DRY_RUN=${DRY_RUN:-0}
case "$DRY_RUN" in 0|1) ;; *) echo "DRY_RUN must be 0 or 1, got '$DRY_RUN'" >&2; exit 2 ;; esac
DIR="$ROOT/build/sanitize-$ISA"
SRC="$DIR/src"

echo "== building with FRCNN_SANITIZE=address,undefined ${isa_env[*]:-} in $SRC"
if [ "$DRY_RUN" = 0 ]; then
  mkdir -p "$SRC"
  # The working tree as git sees it (tracked and untracked-but-not-ignored files), mtimes kept: ninja rebuilds only
  # what changed since the last run.
  git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$SRC"
  (cd "$SRC" && env FORCE_CUDA=0 FRCNN_SANITIZE=address,undefined "${isa_env[@]}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" setup.py -q build_ext --inplace > "$DIR/build.log" 2>&1) || { tail -30 "$DIR/build.log"; exit 1; }
fi

LIBASAN=$(gcc -print-file-name=libasan.so)
LIBUBSAN=$(gcc -print-file-name=libubsan.so)
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(tests/ops tests/models)
if [ "$TWIN" = 1 ] && [ "$DRY_RUN" = 0 ] && ! grep -q "CPU_AVX512_TWIN = True" "$SRC/fasterrcnn_ext/_build_config.py"; then
  echo "TWIN=1 but the build has no AVX-512 CPU twins: install simde-py into .venv" >&2; exit 1
fi
label="$ISA build"
[ "$TWIN" = 0 ] || label="$label, AVX-512 CPU twins"
echo "== pytest ${args[*]} under ASan + UBSan (CPU only; $label)"
if [ "$DRY_RUN" = 1 ]; then
  echo "== dry run: nothing built or run"
  exit 0
fi
rm -f "$DIR"/lsan.* "$DIR"/report.* "$DIR/junit.xml"
cd "$SRC"
env CUDA_VISIBLE_DEVICES="" FRCNN_USE_AVX512_TWIN="$TWIN" LD_PRELOAD="$LIBASAN $LIBUBSAN" \
  ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:detect_stack_use_after_return=0:strict_init_order=1" \
  LSAN_OPTIONS="exitcode=0:log_path=$DIR/report" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  PYTHONPATH="$SRC" "$PY" -m pytest -q -p no:cacheprovider -x --junit-xml="$DIR/junit.xml" "${args[@]}" || true
status=0
# The counts, from the JUnit report: pytest's own closing line can be lost at the instrumented interpreter's exit.
# No JUnit report: pytest did not finish (a sanitizer stopped it: the error is in the reports below).
"$PY" - "$DIR/junit.xml" <<'EOF' || status=1
import os
import sys
import xml.etree.ElementTree as ET

if not os.path.exists(sys.argv[1]):
    sys.exit("== tests: pytest did not finish (no JUnit report)")
suite = ET.parse(sys.argv[1]).getroot().find("testsuite")
tests, failed, skipped, errors = (int(suite.get(k)) for k in ("tests", "failures", "skipped", "errors"))
print(f"== tests: {tests - failed - skipped - errors} passed, {failed} failed, {skipped} skipped, {errors} errors")
sys.exit(1 if failed or errors or tests == skipped else 0)  # nothing ran: not a clean run either
EOF

# Errors: every report but LeakSanitizer's at exit (a memory error, undefined behaviour, a refused dlopen, a crash).
errors=$( (grep -L "ERROR: LeakSanitizer" "$DIR"/report.* 2>/dev/null || true
           grep -l "ERROR: AddressSanitizer\|runtime error:\|DEADLYSIGNAL" "$DIR"/report.* 2>/dev/null || true) | sort -u)
if [ -n "$errors" ]; then
  echo "== sanitizer errors in $(echo "$errors" | wc -l) process(es):"
  for f in $errors; do echo "-- $f"; head -60 "$f"; done
  status=1
fi

# Leak reports: keep those with a symbolized frame in our library (scripts/our_leaks.awk says what counts).
cat "$DIR"/report.* > "$DIR/leaks.txt" 2>/dev/null || true
our_leaks=$(awk -f "$ROOT/scripts/our_leaks.awk" "$DIR/leaks.txt")
ours=$(grep -c "leak of" <<< "$our_leaks" || true)
all=$(grep -c "leak of" "$DIR/leaks.txt" || true)
echo "== leaks: $all reported at exit, $ours with a frame in fasterrcnn_ext's library"
if [ "$ours" -gt 0 ]; then
  head -80 <<< "$our_leaks"
  status=1
fi
[ $status -eq 0 ] && echo "== sanitizers ($label): clean" || echo "== sanitizers ($label): FAILED" >&2
exit $status

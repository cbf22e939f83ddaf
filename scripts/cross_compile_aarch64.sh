#!/usr/bin/env bash
# Compiles every CPU source of the extension for aarch64 (ARM Linux) with a cross-compiler, to show that
# `pip install` builds there: the x86 intrinsics and function multiversioning must stay fenced off on other
# architectures. Objects only (no link: torch's aarch64 libraries are not here); torch's headers are the installed
# x86 torch's, which are the same for every architecture.
#
#   apt-get install g++-aarch64-linux-gnu      # Debian's cross-compiler, once
#   bash scripts/cross_compile_aarch64.sh      # exit 0: every source compiled
#
#   CXX=...      the cross-compiler (default aarch64-linux-gnu-g++)
#   PYTHON=...   a Python with torch installed (default .venv/bin/python)
#   JOBS=...     parallel compiles (default: the number of cores)
set -euo pipefail
cd "$(dirname "$0")/.."

CXX=${CXX:-aarch64-linux-gnu-g++}
PYTHON=${PYTHON:-.venv/bin/python}
JOBS=${JOBS:-$(nproc)}
command -v "$CXX" >/dev/null || { echo "$CXX not found: apt-get install g++-aarch64-linux-gnu" >&2; exit 2; }

read -r -a INCLUDES < <("$PYTHON" - <<'EOF'
import sysconfig
from torch.utils.cpp_extension import include_paths
print(" ".join(f"-I{p}" for p in include_paths() + [sysconfig.get_paths()["include"]]))
EOF
)
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml)
# SIMDe for the AVX-512 kernel's CPU twin, as setup.py finds it (on ARM SIMDe implements the x86 intrinsics with
# NEON or plain C); without it the twin is left out, as setup.py does.
SIMDE=$("$PYTHON" -c "import simde_py; print(simde_py.get_include())" 2>/dev/null || true)
if [ -n "$SIMDE" ]; then TWIN_FLAGS=(-DFRCNN_CPU_AVX512_TWIN=1 "-I$SIMDE"); else TWIN_FLAGS=(-DFRCNN_CPU_AVX512_TWIN=0); fi
# The flags setup.py gives the host compiler (the CPU sources only: no FRCNN_WITH_CUDA).
FLAGS=(-std=c++20 -O2 -fPIC -fvisibility=hidden -fopenmp -ffp-contract=off -fno-trapping-math -Wall
       -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -DPy_LIMITED_API=0x030A0000
       "-DFRCNN_VERSION=\"$VERSION\"" "${TWIN_FLAGS[@]}" -Icsrc "${INCLUDES[@]}")

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
mapfile -t SOURCES < <(ls csrc/*.cpp csrc/ops/*.cpp csrc/ops/common/*.cpp csrc/ops/cpu/*.cpp csrc/ops/composite/*.cpp \
                          csrc/ops/autocast/*.cpp csrc/runtime/*.cpp | { [ -n "$SIMDE" ] && cat || grep -v _twin.cpp; })
echo "compiling ${#SOURCES[@]} CPU sources with $($CXX --version | head -1) ($JOBS at a time)"
export CXX OUT
printf '%s\n' "${SOURCES[@]}" | xargs -P "$JOBS" -I{} bash -c '
  obj="$OUT/$(echo {} | tr / _).o"
  if "$CXX" "$@" -c {} -o "$obj" 2>"$obj.log"; then echo "ok      {}"; else echo "FAILED  {}"; cat "$obj.log"; fi
' _ "${FLAGS[@]}" | tee "$OUT/summary"
failed=$(grep -c '^FAILED' "$OUT/summary" || true)
objects=$(ls "$OUT"/*.o 2>/dev/null | wc -l)
arch=$(file -b "$(ls "$OUT"/*.o | head -1)" 2>/dev/null | cut -d, -f2 | xargs || true)
if [ "$failed" -ne 0 ] || [ "$objects" -ne "${#SOURCES[@]}" ]; then
  echo "aarch64: $failed of ${#SOURCES[@]} sources failed to compile" >&2
  exit 1
fi
echo "aarch64: all ${#SOURCES[@]} CPU sources compiled ($arch)"

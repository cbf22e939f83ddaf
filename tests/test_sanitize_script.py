"""scripts/sanitize.sh reaches its test run in every mode (its build and run take minutes: DRY_RUN=1 stops before
them), and refuses bad settings with a message."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def sanitize(**env):
    return subprocess.run(["bash", "scripts/sanitize.sh", "tests/ops", "-k", "nms"], cwd=ROOT,
                          env={**os.environ, "DRY_RUN": "1", **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("isa, twin, label", [("default", "0", "default build"), ("avx2", "0", "avx2 build"),
                                              ("default", "1", "default build, AVX-512 CPU twins"),
                                              ("avx2", "1", "avx2 build, AVX-512 CPU twins")])
def test_every_mode_reaches_the_test_run(isa, twin, label):
    done = sanitize(ISA=isa, TWIN=twin)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"build/sanitize-{isa}/src" in done.stdout
    assert ("FRCNN_CPU_MAX_ISA=avx2" in done.stdout) == (isa == "avx2")
    assert f"== pytest tests/ops -k nms under ASan + UBSan (CPU only; {label})" in done.stdout
    assert "dry run: nothing built or run" in done.stdout


@pytest.mark.parametrize("setting, message", [({"ISA": "avx512"}, "ISA must be 'default' or 'avx2', got 'avx512'"),
                                              ({"TWIN": "yes"}, "TWIN must be 0 or 1, got 'yes'"),
                                              ({"DRY_RUN": "2"}, "DRY_RUN must be 0 or 1, got '2'")])
def test_bad_settings_are_refused(setting, message):
    done = sanitize(**setting)
    assert done.returncode == 2
    assert message in done.stderr


# LeakSanitizer's report at exit, as sanitize.sh collects it: blocks of one leak each, shaped like the real ones.
LIBS = "/work/.venv/lib/python3.11/site-packages"
OURS = "/work/build/sanitize-default/src/fasterrcnn_ext/_C.abi3.so"
LEAK_REPORT = f"""=================================================================
==3265==ERROR: LeakSanitizer: detected memory leaks

Direct leak of 1001 byte(s) in 1 object(s) allocated from:
    #0 0x7f479dcb89cf in __interceptor_malloc ../../../../src/libsanitizer/asan/asan_malloc_linux.cpp:69
    #1 0x7f479cfaf897 in _PyObject_Malloc Objects/obmalloc.c:2003

Indirect leak of 1002 byte(s) in 16 object(s) allocated from:
    #0 0x7f28f727077b in __interceptor_strdup ../../../../src/libsanitizer/asan/asan_interceptors.cpp:439
    #1 0x7f2870007973 in pybind11::cpp_function::initialize_generic() ({LIBS}/torch/lib/libtorch_python.so+0x4079)
    #2 0x7f2800000000  ({OURS}+0x2600000)

Direct leak of 1003 byte(s) in 1 object(s) allocated from:
    #0 0x7f479dcb89cf in __interceptor_malloc ../../../../src/libsanitizer/asan/asan_malloc_linux.cpp:69
    #1 0x7f1c1a2b3c4d in fasterrcnn_ext::nms_kernel(at::Tensor const&, double) /work/src/csrc/ops/cpu/nms_kernel.cpp:88
    #2 0x7f1c1a2b0000 in c10::impl::call_functor ({LIBS}/torch/lib/libtorch_cpu.so+0x1234)

Direct leak of 1004 byte(s) in 1 object(s) allocated from:
    #0 0x7f479dcb89cf in __interceptor_malloc ../../../../src/libsanitizer/asan/asan_malloc_linux.cpp:69
    #1 0x7f1c1a2b3c4d in fasterrcnn_ext::cpu_memory_pool_allocate(unsigned long) ({OURS}+0x1a2b3c)

Indirect leak of 1005 byte(s) in 2 object(s) allocated from:
    #0 0x7f479dcb89cf in __interceptor_malloc ../../../../src/libsanitizer/asan/asan_malloc_linux.cpp:69
    #1 0x7f2870001111 in torch::autograd::Node::Node() /pytorch/torch/csrc/autograd/function.h:120
    #2 0x7f2870002222 in torch::jit::Code::Code() /pytorch/torch/csrc/jit/runtime/interpreter.cpp:1010

Direct leak of 1006 byte(s) in 1 object(s) allocated from:
    #0 0x7f479dcb89cf in __interceptor_malloc ../../../../src/libsanitizer/asan/asan_malloc_linux.cpp:69
    #1 0x7f1c1a2b3c4d in at::empty(c10::ArrayRef<long>) /work/src/csrc/runtime/cpu_memory_pool.cpp:57

SUMMARY: AddressSanitizer: 6021 byte(s) leaked in 22 allocation(s).
"""


@pytest.mark.parametrize("awk", sorted({os.path.realpath(found) for name in ("awk", "mawk", "gawk", "original-awk")
                                        if (found := shutil.which(name))}))
def test_leak_filter_keeps_the_leaks_with_a_symbolized_frame_in_our_library(awk, tmp_path):
    """scripts/our_leaks.awk keeps a leak whose trace names our source file or a function in our library, and drops
    Python's, torch's (whose sources also sit under a csrc/) and the pybind11 strdup whose last frame is a bare
    address the unwinder attributed to our library: the frame above it names a function, on another line."""
    (tmp_path / "leaks.txt").write_text(LEAK_REPORT)
    kept = subprocess.run([awk, "-f", str(ROOT / "scripts/our_leaks.awk"), str(tmp_path / "leaks.txt")],
                          capture_output=True, text=True, check=True, timeout=60).stdout
    assert re.findall(r"leak of (\d+) byte", kept) == ["1003", "1004", "1006"]
    assert "ERROR: LeakSanitizer" not in kept and "SUMMARY" not in kept
    # Each leak is kept whole: its header line and every frame.
    assert kept.count("#0 0x7f479dcb89cf in __interceptor_malloc") == 3
    assert "libtorch_cpu.so+0x1234" in kept


def test_sanitize_counts_leaks_with_that_filter():
    script = (ROOT / "scripts/sanitize.sh").read_text()
    assert 'our_leaks=$(awk -f "$ROOT/scripts/our_leaks.awk" "$DIR/leaks.txt")' in script

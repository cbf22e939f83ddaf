"""The library holds two compilations of roi_pool_avx512.h, told apart by their instructions: the AVX-512 kernel
(zmm registers, mask registers) and its CPU twin on SIMDe's portable intrinsics (neither, so it runs on any x86-64
CPU). Both have the same C++ names: with external linkage the linker would keep a single copy for both, which no
result test sees (the twin gives the same bits). Read from the built library with binutils (nm, objdump)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import fasterrcnn_ext
from fasterrcnn_ext import build_info

if shutil.which("nm") is None or shutil.which("objdump") is None:
    pytest.skip("binutils (nm, objdump) not installed", allow_module_level=True)

LIBRARY = next(Path(fasterrcnn_ext.__file__).parent.glob("_C*.so"))
AVX512_REGISTER = re.compile(r"%zmm\d|%k[1-7]\b")
CALL = re.compile(r"\bcall\s+(?:0x)?([0-9a-f]+)\s")


def functions():
    """{address: (demangled name, disassembly)} of the library's functions whose name mentions max_pool_bin_avx512."""
    listing = subprocess.run(["nm", "-C", "-S", "--defined-only", str(LIBRARY)], capture_output=True, text=True,
                             check=True).stdout
    found = {}
    for line in listing.splitlines():
        parts = line.split(maxsplit=3)
        if len(parts) == 4 and parts[2] in "tTwW" and "max_pool_bin_avx512" in parts[3]:
            address, size = int(parts[0], 16), int(parts[1], 16)
            found[address] = (parts[3], disassembly(address, size))
    return found


def disassembly(address, size):
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={address:#x}",
                           f"--stop-address={address + size:#x}", str(LIBRARY)],
                          capture_output=True, text=True, check=True).stdout


def reached_from(entries, known):
    """The functions of ``known`` that ``entries`` run: themselves and, transitively, those they call."""
    reached, todo = set(), list(entries)
    while todo:
        address = todo.pop()
        if address in reached:
            continue
        reached.add(address)
        todo += [int(a, 16) for a in CALL.findall(known[address][1]) if int(a, 16) in known]
    return reached


@pytest.mark.parametrize("dtype", ["float", "double"])
def test_the_avx512_kernel_and_its_twin_are_separate_code(dtype):
    known = functions()
    twin = [a for a, (name, _) in known.items() if name.startswith(f"fasterrcnn_ext::max_pool_bin_avx512_twin({dtype}")]
    kernels = {a for a, (name, _) in known.items() if f"max_pool_bin_avx512<{dtype}>" in name}
    with_avx512 = {a for a in kernels if AVX512_REGISTER.search(known[a][1])}
    twin_code = set()
    if build_info()["cpu_avx512_twin"]:
        assert len(twin) == 1, [name for name, _ in known.values()]
        twin_code = reached_from(twin, known)
        assert not any(AVX512_REGISTER.search(known[a][1]) for a in twin_code), "the twin runs AVX-512 instructions"
    if build_info()["cpu_max_isa"] == "avx512":  # the AVX-512 kernel is built: one copy of it, not the twin's
        assert len(with_avx512 - twin_code) == 1, {known[a][0] for a in kernels}
    else:
        assert not with_avx512

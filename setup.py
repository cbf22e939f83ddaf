"""Build fasterrcnn_ext: C++ (CPU) kernels always, CUDA kernels when a GPU is visible or FORCE_CUDA=1.

Environment:
  FORCE_CUDA=1            compile the CUDA kernels even with no GPU (needs nvcc; an error otherwise).
  FORCE_CUDA=0            never compile CUDA kernels.
  TORCH_CUDA_ARCH_LIST    GPU architectures, e.g. "8.0;9.0+PTX". Default with no GPU: 7.5 to 9.0 plus PTX.
  CUDA_HOME               the CUDA toolkit; found from nvcc on PATH when unset.
  MAX_JOBS                parallel compile jobs for ninja.
  FRCNN_CPU_MAX_ISA=avx2  leave the AVX-512 clones of the CPU kernels out: an AVX-512 machine then runs (and
                          benchmarks) the code that AVX2-only CPUs run.
  FRCNN_AVX512_TWIN=0     leave out the CPU twin of the hand-written AVX-512 kernel (built by default where the
                          SIMDe headers are installed: the simde-py package, Debian's libsimde-dev, or
                          SIMDE_INCLUDE=<folder holding simde/>).
  FRCNN_SANITIZE=address,undefined
                          build the C++ sources with AddressSanitizer and UndefinedBehaviorSanitizer (any
                          -fsanitize= list); Python must then preload libasan (scripts/sanitize.sh does it all).
"""

import glob
import os
import re
import runpy
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# pyproject.toml is the version's one home; the package's own reader, run without importing the package.
VERSION = runpy.run_path(os.path.join(ROOT, "fasterrcnn_ext", "_version.py"))["pyproject_version"](
    os.path.join(ROOT, "pyproject.toml"))
if VERSION is None:
    sys.exit("pyproject.toml has no [project] version line (version = \"X.Y.Z\")")
DEFAULT_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"  # T4 to H100, plus PTX for newer GPUs


def _find_cuda_home():
    """CUDA_HOME from the environment, else the toolkit that the nvcc on PATH really belongs to.

    torch guesses dirname(dirname(which nvcc)), which is wrong when nvcc is a wrapper script
    (such as a /usr/local/bin/nvcc that execs /usr/local/cuda-13.0/bin/nvcc).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):  # a wrapper script: find the real nvcc it runs
                candidates += re.findall(rb"(/[^\s\"']+)/bin/nvcc", head)
        except OSError:
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))).encode())
    candidates.append(b"/usr/local/cuda")
    for c in candidates:
        c = c.decode()
        if os.path.exists(os.path.join(c, "bin", "nvcc")) and os.path.isdir(os.path.join(c, "include")):
            return c
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    force = os.environ.get("FORCE_CUDA", "")
    if force == "0":
        return False
    if force == "1":
        if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
            sys.exit("FORCE_CUDA=1 but nvcc was not found: put nvcc on PATH or set CUDA_HOME to the CUDA toolkit.")
        if torch.version.cuda is None:
            sys.exit(f"FORCE_CUDA=1 but the installed torch {torch.__version__} is a CPU-only build; "
                     "install a CUDA build of torch to compile the CUDA kernels.")
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None and torch.version.cuda is not None


def _nvcc_version():
    out = subprocess.check_output([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], text=True)
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def _missing_cuda_headers_dir():
    """A folder of links to headers that torch's CUDA headers include but the toolkit lacks (cusparse.h, ...).

    The nvidia-* pip packages installed with torch's CUDA wheels carry them. Only headers the toolkit
    does not have are linked, so the toolkit's own headers always win.
    """
    toolkit_inc = os.path.join(CUDA_HOME, "include")
    site_dirs = {os.path.dirname(os.path.dirname(torch.__file__))}
    sources = []
    for site in site_dirs:
        sources += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    if not sources:
        return None
    out = os.path.join(ROOT, "build", "cuda_extra_include")
    os.makedirs(out, exist_ok=True)
    linked = 0
    for src in sources:
        for name in os.listdir(src):
            if os.path.exists(os.path.join(toolkit_inc, name)) or os.path.lexists(os.path.join(out, name)):
                continue
            os.symlink(os.path.join(src, name), os.path.join(out, name))
            linked += 1
    return out


def _simde_include():
    """The folder holding SIMDe's headers (simde/x86/avx512.h), or None.

    SIMDe implements the x86 intrinsics in portable C; the AVX-512 kernel's CPU twin (roi_pool_avx512_twin.cpp) is
    compiled with it so that CPUs without AVX-512 test that kernel's source.
    """
    candidates = [os.environ["SIMDE_INCLUDE"]] if os.environ.get("SIMDE_INCLUDE") else []
    try:
        import simde_py

        candidates.append(simde_py.get_include())
    except ImportError:
        pass
    candidates.append("/usr/include")  # Debian's libsimde-dev
    for folder in candidates:
        if os.path.exists(os.path.join(folder, "simde", "x86", "avx512.h")):
            return folder
    return None


def _write_build_config(with_cuda, cuda_version, arch_list, cpu_max_isa, cpu_avx512_twin):
    """Record what this build was made against, readable before the library is loaded."""
    path = os.path.join(ROOT, "fasterrcnn_ext", "_build_config.py")
    text = (
        "# Written by setup.py at build time. Do not edit.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_VERSION = {cuda_version!r}\n"
        f"CUDA_ARCH_LIST = {arch_list!r}\n"
        f"CPU_MAX_ISA = {cpu_max_isa!r}\n"
        f"CPU_AVX512_TWIN = {cpu_avx512_twin!r}\n"
    )
    with open(path, "w") as f:
        f.write(text)


def _extensions():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "ops", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "ops", "common", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "ops", "cpu", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "ops", "composite", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "ops", "autocast", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "runtime", "*.cpp")))
    # -fopenmp: at::parallel_for is inline and uses `#pragma omp parallel` when torch's backend is OpenMP;
    # without the flag the pragma is ignored and every "parallel" loop runs on one thread. The libgomp.so.1 it
    # links is the one torch already loaded (same soname), so torch.set_num_threads applies.
    # -ffp-contract=off / --fmad=false: no fused multiply-adds, so the shared box math rounds like torchvision's
    # tensor ops and the CPU and CUDA kernels agree bit for bit.
    # -fno-trapping-math: floating-point operations raise no traps we rely on, so GCC may evaluate both sides of a
    # float select (a NaN-preserving clamp, box_exp's range tests) and vectorise the loop. Without it only the
    # AVX-512 clones (masked compares) vectorise those loops: AVX2 CPUs run them scalar, 5x slower
    # (docs/performance.md). Values are unaffected (no reassociation, no finite-math assumptions).
    cxx_flags = ["-O3", "-fvisibility=hidden", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"]
    define_macros = [("FRCNN_VERSION", f'"{VERSION}"')]
    max_isa = os.environ.get("FRCNN_CPU_MAX_ISA", "")
    if max_isa not in ("", "avx2"):
        sys.exit(f"FRCNN_CPU_MAX_ISA={max_isa!r}: the only value is 'avx2' (unset: every clone up to AVX-512)")
    if max_isa == "avx2":
        define_macros.append(("FRCNN_CPU_MAX_ISA_AVX2", "1"))
    link_flags = ["-fopenmp"]
    sanitize = os.environ.get("FRCNN_SANITIZE", "")
    if sanitize:
        if not re.fullmatch(r"[a-z,-]+", sanitize):
            sys.exit(f"FRCNN_SANITIZE={sanitize!r}: give a -fsanitize= list such as 'address,undefined'")
        # -O1 and frame pointers: reports with exact lines; no recovery, so the first finding stops the process.
        # The CPU kernels only: nvcc has no such sanitizers (compute-sanitizer checks the CUDA kernels).
        sanitizer_flags = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
        cxx_flags = [f for f in cxx_flags if f != "-O3"] + ["-O1"] + sanitizer_flags
        link_flags += sanitizer_flags
    include_dirs = [os.path.join(ROOT, "csrc")]
    twin_source = os.path.join("csrc", "ops", "cpu", "roi_pool_avx512_twin.cpp")
    want_twin = os.environ.get("FRCNN_AVX512_TWIN", "") != "0"
    simde_include = _simde_include() if want_twin else None
    if simde_include is None:
        sources.remove(twin_source)
        if want_twin:
            print("fasterrcnn_ext: SIMDe headers not found (pip install simde-py): building without the AVX-512 "
                  "kernel's CPU twin", flush=True)
    elif simde_include != "/usr/include":  # never -I a system folder: it reorders #include_next
        include_dirs.append(simde_include)
    define_macros.append(("FRCNN_CPU_AVX512_TWIN", "1" if simde_include else "0"))
    cuda_version, arch_list = None, None
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "ops", "cuda", "*.cu")))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = (
                ";".join(sorted({f"{p[0]}.{p[1]}" for p in
                                 (torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))}))
                if torch.cuda.is_available() else DEFAULT_ARCH_LIST)
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        cuda_version = _nvcc_version()
        extra_inc = _missing_cuda_headers_dir()
        if extra_inc:
            include_dirs.append(extra_inc)
        define_macros += [("FRCNN_WITH_CUDA", "1"), ("FRCNN_CUDA_VERSION", f'"{cuda_version}"'),
                          ("FRCNN_CUDA_ARCH_LIST", f'"{arch_list}"')]
        ext_cls = CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
    else:
        ext_cls = CppExtension
        extra = {"cxx": cxx_flags}
    _write_build_config(with_cuda, cuda_version, arch_list, max_isa or "avx512", simde_include is not None)
    print(f"fasterrcnn_ext: building with CUDA={with_cuda} (arch list {arch_list}, nvcc {cuda_version}), "
          f"torch {torch.__version__}", flush=True)
    return [ext_cls("fasterrcnn_ext._C", sources, include_dirs=include_dirs, define_macros=define_macros,
                    extra_compile_args=extra, extra_link_args=link_flags, py_limited_api=True)]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)

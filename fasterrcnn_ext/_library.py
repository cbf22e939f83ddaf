"""Loads the compiled kernels (fasterrcnn_ext._C) and reports what they were built with.

Importing fasterrcnn_ext never fails because of the compiled library: if it is missing or was built for another
torch, the import still works and the first op call raises an error that says how to rebuild.
"""

from __future__ import annotations

import torch

REBUILD_HINT = (
    "Rebuild it against the installed torch from the fasterrcnn_ext source folder with "
    "`pip install --no-build-isolation -e .` (FORCE_CUDA=1 to include the CUDA kernels)."
)


def _load() -> str | None:
    """Loads the library; returns None on success, else why it could not be loaded."""
    try:
        from . import _build_config
    except ImportError:
        return "the compiled library is missing: fasterrcnn_ext was not built (no fasterrcnn_ext/_build_config.py)."
    if _build_config.TORCH_VERSION != torch.__version__:
        # Loading a library built for another torch can crash the process, so it is not even tried.
        return (f"the compiled library was built against torch {_build_config.TORCH_VERSION}, "
                f"but torch {torch.__version__} is installed.")
    try:
        from . import _C  # noqa: F401  (registers the ops)
    except (ImportError, OSError) as e:
        return f"the compiled library failed to load: {e}"
    return None


LOAD_ERROR: str | None = _load()
LOADED: bool = LOAD_ERROR is None


class ExtensionNotBuiltError(RuntimeError):
    """Raised when an op is called but the compiled library could not be loaded."""


def assert_loaded() -> None:
    """A clear error if the compiled library is not usable (the op wrappers call it in eager mode, before
    ``torch.ops.fasterrcnn_ext.<op>``, which would otherwise fail with "no such operator")."""
    if not LOADED:
        raise ExtensionNotBuiltError(f"fasterrcnn_ext: {LOAD_ERROR} {REBUILD_HINT}")


def ops():
    """torch.ops.fasterrcnn_ext, or a clear error if the compiled library is not usable."""
    assert_loaded()
    return torch.ops.fasterrcnn_ext


def library_path() -> str:
    """The path of the op library (fasterrcnn_ext/_C*.so): the Python extension module, which C++ programs load too
    (LibTorch, AOTInductor runners, Triton's PyTorch backend: ``dlopen`` it, or LD_PRELOAD it, before loading a
    model that calls the ops). It needs torch's libc10 and libtorch_cpu (libtorch_cuda for the CUDA kernels) and no
    Python. Raises ExtensionNotBuiltError if the library is not usable here."""
    assert_loaded()
    from . import _C

    return _C.__file__


def build_info() -> dict:
    """What the compiled library was built with.

    Returns a dict with ``version`` (package), ``torch_version`` (the torch it was built against), ``cuda``
    (whether CUDA kernels were compiled *and* registered), ``cuda_version`` and ``cuda_arch_list``,
    ``parallel_backend`` (the CPU threading backend), ``cpu_max_isa`` (``"avx512"``, or ``"avx2"`` for a build
    without the AVX-512 clones of the CPU kernels), ``cpu_avx512_twin`` (whether the portable twin of the hand-written
    AVX-512 kernel is built: it lets CPUs without AVX-512 test that kernel), ``num_threads``, ``loaded`` and, when not
    loaded, ``error``.
    """
    from . import __version__

    info: dict = {"version": __version__, "loaded": LOADED, "num_threads": torch.get_num_threads()}
    if not LOADED:
        info.update(torch_version=None, cuda=False, cuda_version=None, cuda_arch_list=[], parallel_backend=None,
                    cpu_max_isa=None, cpu_avx512_twin=False, error=LOAD_ERROR)
        return info
    raw = dict(line.split("=", 1) for line in torch.ops.fasterrcnn_ext._build_info().splitlines() if line)
    compiled_cuda = raw.get("cuda") == "1"
    # Ask the dispatcher too: "cuda" must mean the CUDA kernels are really there.
    registered_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("fasterrcnn_ext::nms", "CUDA")
    info.update(
        version=raw["version"],
        torch_version=raw["torch_version"],
        cuda=compiled_cuda and registered_cuda,
        cuda_version=raw.get("cuda_version"),
        cuda_arch_list=raw["cuda_arch_list"].replace(" ", ";").split(";") if "cuda_arch_list" in raw else [],
        parallel_backend=raw["parallel_backend"],
        cpu_max_isa=raw["cpu_max_isa"],
        cpu_avx512_twin=raw.get("cpu_avx512_twin") == "1",
    )
    return info

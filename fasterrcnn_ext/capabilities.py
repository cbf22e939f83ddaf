"""Which CPU fast paths run on this machine: the one place that decides.

Each CPU-specific fast path is chosen here at run time, from what this CPU and this torch build can do (never from
what the build machine had), and each has a fallback that computes the same thing:

================================  =================================================  ===================================
capability                        on                                                 off (the fallback)
================================  =================================================  ===================================
``avx512_kernels``                hand-written AVX-512 loops (roi_pool's running     the portable loops (compiled for
                                  max); needs a build with them and AVX512F          AVX-512, AVX2 and x86-64, picked by
                                                                                     the loader)
``native_bfloat16``               AVX512-BF16 or AMX: bfloat16 inference pays        bfloat16 inference runs emulated,
                                                                                     slower than float32, and warns
``native_int8``                   int8 dot products in hardware (AVX512-VNNI,        int8 inference (quantization.py)
                                  AVX-VNNI or AMX): int8 inference pays              uses 7-bit activations (AVX2's
                                                                                     16-bit sums saturate), warns
``fused_bfloat16_convolutions``   in the bfloat16 inference copy, each convolution   torch's convolutions under autocast
                                  with its ReLU and residual add as one oneDNN call  (separate ReLU and add)
                                  (needs oneDNN's bfloat16 path: AVX512BW/VL/DQ or
                                  AVX-NE-CONVERT)
``winograd``                      float32 3x3 stride-1 convolutions of the CPU       oneDNN's direct convolution
                                  inference copy by ops.conv3x3_winograd
``memory_pool``                   the CPU inference forward and each CPU training    torch's CPU allocator
                                  step of engine.train reuse their large blocks
                                  (fasterrcnn_ext.memory)
================================  =================================================  ===================================

    from fasterrcnn_ext import capabilities
    capabilities.cpu_capabilities()                 # what runs here
    with capabilities.forced(winograd=False):       # a fallback, for a test or a measurement
        ...

``avx512_twin()`` is not a capability but a check: inside it the hand-written AVX-512 kernels are replaced by their
CPU twins (the same source built on SIMDe's portable intrinsics), so that a CPU without AVX-512 tests their logic.

Any capability can be forced off. Forcing one on where this machine lacks it raises ValueError (it would crash or
fail), except ``native_bfloat16`` and ``native_int8``, which decide warnings, int8's activation range and the
benchmark's rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import torch

from . import _library

__all__ = ["CpuCapabilities", "avx512_twin", "cpu_capabilities", "detected", "forced"]


@dataclasses.dataclass(frozen=True)
class CpuCapabilities:
    avx512_kernels: bool
    native_bfloat16: bool
    native_int8: bool
    fused_bfloat16_convolutions: bool
    winograd: bool
    memory_pool: bool


def _torch_cpu_check(name: str) -> bool:
    check = getattr(torch.cpu, name, None)  # private torch functions: absent in some releases means "no"
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def _linux_cpu_flags() -> set[str]:
    # torch probes AVX512-VNNI but not AVX-VNNI (its 256-bit form, which oneDNN's int8 kernels also use): the
    # kernel's flag list says. Empty elsewhere.
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def _avx512_kernels_available() -> bool:
    if not _library.LOADED:
        return False
    built, cpu_has, _ = _library.ops()._cpu_avx512_kernels()
    return bool(built and cpu_has)


def _onednn_bfloat16_convolutions() -> bool:
    # torch.ops.mkldnn._convolution_pointwise is the op torch.compile's CPU backend fuses convolutions into; it is
    # private, so its absence (a build without oneDNN, a future torch) means no fusion rather than an error. Its
    # bfloat16 path refuses CPUs without AVX512BW/VL/DQ or AVX-NE-CONVERT ("mkldnn_convolution: bf16 path needs the
    # cpu support ..."): _is_mkldnn_bf16_supported is oneDNN's own test of that.
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return False
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return supported is not None and bool(supported())
    except RuntimeError:
        return False


@functools.cache
def detected() -> CpuCapabilities:
    """What this CPU and this build can do (probed once per process)."""
    return CpuCapabilities(
        avx512_kernels=_avx512_kernels_available(),
        native_bfloat16=_torch_cpu_check("_is_avx512_bf16_supported") or _torch_cpu_check("_is_amx_tile_supported"),
        native_int8=(_torch_cpu_check("_is_vnni_supported") or _torch_cpu_check("_is_amx_tile_supported")
                     or "avx_vnni" in _linux_cpu_flags()),
        fused_bfloat16_convolutions=_onednn_bfloat16_convolutions(),
        winograd=_library.LOADED,
        memory_pool=_library.LOADED,
    )


_forced: dict[str, bool] = {}


def cpu_capabilities() -> CpuCapabilities:
    """The capabilities in effect: the detected ones, with any that ``forced`` set."""
    return dataclasses.replace(detected(), **_forced) if _forced else detected()


@contextlib.contextmanager
def forced(**flags: bool) -> Iterator[CpuCapabilities]:
    """Forces capabilities on or off inside the block (nests; restores the previous setting), e.g.
    ``forced(winograd=False, avx512_kernels=False)``. Yields the capabilities in effect.

    Forcing affects what is decided inside the block: the detector's inference copies are rebuilt for the new
    capabilities on their next call (they remember which capabilities they were built with)."""
    names = {f.name for f in dataclasses.fields(CpuCapabilities)}
    for name, value in flags.items():
        if name not in names:
            raise ValueError(f"forced: unknown capability {name!r}; the capabilities are {sorted(names)}")
        if not isinstance(value, bool):
            raise ValueError(f"forced: {name} must be True or False, got {value!r}")
        if value and name not in ("native_bfloat16", "native_int8") and not getattr(detected(), name):
            raise ValueError(f"forced: this machine lacks {name}, so it cannot be forced on")
    previous = dict(_forced)
    _forced.update(flags)
    _apply_to_kernels()
    try:
        yield cpu_capabilities()
    finally:
        _forced.clear()
        _forced.update(previous)
        _apply_to_kernels()


def _apply_to_kernels() -> None:
    """The compiled kernels read their one switch (the AVX-512 loops) from the library itself."""
    if _library.LOADED:
        _library.ops()._cpu_set_avx512_kernels(cpu_capabilities().avx512_kernels)


@contextlib.contextmanager
def avx512_twin(enabled: bool = True) -> Iterator[None]:
    """Runs the CPU twins of the hand-written AVX-512 kernels inside the block, on any x86-64 CPU (``enabled=False``:
    turns them off; nests; restores the previous setting). They give the AVX-512 kernels' results, slowly: for tests,
    not for speed. The environment variable FRCNN_USE_AVX512_TWIN=1 turns them on for a whole process
    (scripts/sanitize.sh).

    Raises ValueError where the library was built without them (setup.py builds them where SIMDe is installed)."""
    built = _library.LOADED and _library.build_info()["cpu_avx512_twin"]
    if enabled and not built:
        raise ValueError("avx512_twin: this build of fasterrcnn_ext has no AVX-512 CPU twins "
                         "(install simde-py and rebuild)")
    if not built:  # off already, and no switch to turn
        yield
        return
    previous = _library.ops()._cpu_avx512_twin()
    _library.ops()._cpu_set_avx512_twin(enabled)
    try:
        yield
    finally:
        _library.ops()._cpu_set_avx512_twin(previous)

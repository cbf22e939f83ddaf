"""Reuse of large CPU tensors across inference forwards and training steps (the compiled pool in
csrc/runtime/cpu_memory_pool.cpp).

glibc returns large blocks (an R50-FPN forward at 800 pixels allocates about a gigabyte of activations, a training
step at batch 2 several) to the system when they are freed, so each forward page-faults its activations in again;
inside ``cpu_pool()`` blocks of 1 MB or more are kept and reused instead. The detector's inference forward on CPU
runs inside it by default (``FasterRCNN.reuse_cpu_memory``), and so does each step of ``fasterrcnn-ext train``
on the CPU (forward, backward and optimizer update: autograd runs a CPU graph's backward on the calling thread).

    with fasterrcnn_ext.memory.cpu_pool():
        detections = model(images)
    fasterrcnn_ext.memory.empty_cpu_cache()     # give the kept blocks back to the system

    with fasterrcnn_ext.memory.training_cache_limit():   # a training loop of your own
        for images, targets in loader:
            with fasterrcnn_ext.memory.cpu_pool():
                loss = sum(model(images, targets).values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

Only the calling thread's allocations are pooled, and only while inside the context; everything else goes to
torch's allocator unchanged. Free blocks kept in the pool are capped by ``set_cpu_cache_limit`` (2 GiB by
default). Pooled blocks are not reported to torch.profiler's memory view. Long-lived tensors made inside a pooled
forward (the detector's inference copies) are made in ``cpu_pool(enabled=False)``: a pooled block is meant for a
tensor that the next forward allocates again.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
from dataclasses import dataclass

from ._library import ops


@dataclass(frozen=True)
class CpuCacheStats:
    cached_bytes: int  # free blocks kept for reuse
    in_use_bytes: int  # pooled blocks held by live tensors
    hits: int  # allocations served from the pool
    misses: int  # allocations that needed a new block
    limit_bytes: int  # cap on cached_bytes
    active: bool  # False if another library has since replaced torch's CPU allocator
    peak_in_use_bytes: int  # the most pooled bytes held by live tensors at once, since the process started


@contextlib.contextmanager
def cpu_pool(enabled: bool = True):
    """Pools the calling thread's large CPU allocations inside the block, or with ``enabled=False`` pauses an
    enclosing pool's (nests; restores the previous setting)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"cpu_pool: enabled must be a bool, got {enabled!r}")
    previous = ops()._cpu_pool_set_enabled(enabled)
    try:
        yield
    finally:
        ops()._cpu_pool_set_enabled(previous)


def training_cache_limit_bytes() -> int:
    """The cap ``training_cache_limit`` sets: half the machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


@contextlib.contextmanager
def training_cache_limit():
    """Raises the cap on kept free blocks to half the machine's memory inside the block (the default cap, 2 GiB, is
    sized for an inference forward; a training step of R50-FPN at 800 pixels, batch 2, keeps about 4.5 GB), then
    empties the cache and restores the cap. What is kept levels off at about what one step holds at once, since
    each step reuses the blocks of the one before (scripts/soak.py)."""
    previous = cpu_cache_stats().limit_bytes
    set_cpu_cache_limit(max(previous, training_cache_limit_bytes()))
    try:
        yield
    finally:
        empty_cpu_cache()
        set_cpu_cache_limit(previous)


def empty_cpu_cache() -> None:
    """Releases the pool's free memory to the system: every segment none of whose blocks a live tensor holds (a
    larger block taken from the system is split to serve smaller requests; its free parts go back with the rest of
    it, once the tensors holding the other parts are freed)."""
    ops()._cpu_pool_empty_cache()


def set_cpu_cache_limit(limit_bytes: int) -> None:
    """Caps the bytes of free blocks the pool keeps; beyond it, memory goes back to the system as soon as a whole
    segment is free. 0 keeps only the free parts of segments still partly in use."""
    if not isinstance(limit_bytes, int) or isinstance(limit_bytes, bool) or limit_bytes < 0:
        raise ValueError(f"set_cpu_cache_limit: limit_bytes must be an int >= 0, got {limit_bytes!r}")
    ops()._cpu_pool_set_limit(limit_bytes)


def cpu_cache_stats() -> CpuCacheStats:
    cached, in_use, hits, misses, limit, active, peak = ops()._cpu_pool_stats()
    return CpuCacheStats(cached, in_use, hits, misses, limit, bool(active), peak)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Returns the free pages of malloc's heap to the system (glibc's ``malloc_trim``). Blocks below glibc's mmap
    threshold (up to 32 MB once larger blocks have been freed) are carved from the heap, and freeing them leaves
    their pages resident unless they were at its top: after a burst of such temporaries (building the detector's
    inference copies) this gives them back. False where the C library has no such call; the pool's kept blocks are
    not touched (``empty_cpu_cache`` releases those)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True

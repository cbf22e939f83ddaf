"""Reuse of large CPU tensors across inference forwards (the compiled pool in csrc/runtime/cpu_memory_pool.cpp).

glibc returns large blocks (an R50-FPN forward at 800 pixels allocates about a gigabyte of activations) to the
system when they are freed, so each forward page-faults its activations in again; inside ``cpu_pool()`` blocks of
1 MB or more are kept and reused instead. The detector's inference forward on CPU runs inside it by default
(``FasterRCNN.reuse_cpu_memory``).

    with fasterrcnn_ext.memory.cpu_pool():
        detections = model(images)
    fasterrcnn_ext.memory.empty_cpu_cache()     # give the kept blocks back to the system

Only the calling thread's allocations are pooled, and only while inside the context; everything else goes to
torch's allocator unchanged. Free blocks kept in the pool are capped by ``set_cpu_cache_limit`` (2 GiB by
default). Pooled blocks are not reported to torch.profiler's memory view.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def cpu_pool():
    """Pools the calling thread's large CPU allocations inside the block (nests; restores the previous setting)."""
    previous = ops()._cpu_pool_set_enabled(True)
    try:
        yield
    finally:
        ops()._cpu_pool_set_enabled(previous)


def empty_cpu_cache() -> None:
    """Releases every free block of the pool to the system (blocks held by live tensors stay until freed)."""
    ops()._cpu_pool_empty_cache()


def set_cpu_cache_limit(limit_bytes: int) -> None:
    """Caps the bytes of free blocks the pool keeps; 0 keeps none (pooling then only saves nothing)."""
    if not isinstance(limit_bytes, int) or isinstance(limit_bytes, bool) or limit_bytes < 0:
        raise ValueError(f"set_cpu_cache_limit: limit_bytes must be an int >= 0, got {limit_bytes!r}")
    ops()._cpu_pool_set_limit(limit_bytes)


def cpu_cache_stats() -> CpuCacheStats:
    cached, in_use, hits, misses, limit, active = ops()._cpu_pool_stats()
    return CpuCacheStats(cached, in_use, hits, misses, limit, bool(active))

"""The soak (fasterrcnn_ext/benchmark/soak.py): its growth measure catches a leak, and a short run of the detector
(inference and training, each with the CPU memory pool on and off) stays flat. The full run is scripts/soak.py."""

import mmap

import pytest
import torch

from fasterrcnn_ext.benchmark import soak


def test_growth_measure_sees_a_leak_and_not_a_warm_up():
    warm_up_then_flat = [100, 180, 200, 200, 201, 199, 200, 200]
    leaking = [100, 110, 120, 130, 140, 150, 160, 170]
    assert soak.second_half_growth(warm_up_then_flat) <= 1
    assert soak.second_half_growth(leaking) == 170 - 130


def _fresh_pages(nbytes: int) -> mmap.mmap:
    """nbytes of new resident memory: an anonymous mapping, every page written (a tensor of this size could reuse
    free heap that earlier tests left resident, and RSS would not grow)."""
    block = mmap.mmap(-1, nbytes)
    block.write(b"\1" * nbytes)
    return block


def test_a_kept_block_per_call_is_caught():
    kept = []
    result = soak._phase("leak", 40, lambda i: kept.append(_fresh_pages(4 << 20)), bound_bytes=16 << 20, log=None)
    assert not result["flat"] and result["second_half_growth_mb"] >= 30


def test_warm_up_steps_are_run_but_not_measured():
    kept, seen = [], []

    def step(i):
        seen.append(i)
        if i < 30:  # grows only while warming up
            kept.append(torch.ones(1 << 20))

    result = soak._phase("warm", 40, step, bound_bytes=4 << 20, log=None, warmup=30)
    assert seen == list(range(70)) and result["warmup_steps"] == 30 and result["steps"] == 40
    assert result["flat"], result


@pytest.mark.slow
def test_short_soak_of_the_detector_is_flat():
    results = soak.run("fasterrcnn_tiny", calls=60, train_steps=24, bound_mb=32.0, train_warmup=8,
                       log=None)
    assert [r["phase"] for r in results] == ["inference, pool on", "inference, pool off", "training, pool off",
                                                 "training, pool on"]
    for r in results:
        assert r["flat"], r

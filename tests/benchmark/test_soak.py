"""The soak (fasterrcnn_ext/benchmark/soak.py): its growth measure catches a leak, and a short run of the detector
(inference with the CPU memory pool on and off, training) stays flat. The full run is scripts/soak.py."""

import pytest
import torch

from fasterrcnn_ext.benchmark import soak


def test_growth_measure_sees_a_leak_and_not_a_warm_up():
    warm_up_then_flat = [100, 180, 200, 200, 201, 199, 200, 200]
    leaking = [100, 110, 120, 130, 140, 150, 160, 170]
    assert soak.second_half_growth(warm_up_then_flat) <= 1
    assert soak.second_half_growth(leaking) == 170 - 130


def test_a_kept_tensor_per_call_is_caught():
    kept = []
    result = soak._phase("leak", 40, lambda i: kept.append(torch.ones(1 << 20)), bound_bytes=16 << 20, log=None)
    assert not result["flat"] and result["second_half_growth_mb"] >= 30


@pytest.mark.slow
def test_short_soak_of_the_detector_is_flat():
    results = soak.run("fasterrcnn_tiny", calls=60, train_steps=24, bound_mb=32.0, log=None)
    assert [r["phase"] for r in results] == ["inference, pool on", "inference, pool off", "training"]
    for r in results:
        assert r["flat"], r

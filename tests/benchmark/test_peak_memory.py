"""The peak-memory benchmark (fasterrcnn_ext/benchmark/peak_memory.py): each side in its own process, a row with
both peaks, their ratio and our copies' extra bytes."""

import argparse
import io

import pytest

from fasterrcnn_ext.benchmark import peak_memory


def test_a_small_run_reports_both_sides():
    out = io.StringIO()
    (row,) = peak_memory.run("fasterrcnn_mobilenet_v3_large_320_fpn", 96, 128, dtypes=["float32"], repeats=1,
                             calls=1, threads=1, out=out)
    # Each process holds torch, torchvision and a model: far more than nothing, far less than the machine.
    assert 100 < row["torchvision_mb"] < 4096 and 100 < row["ours_mb"] < 4096
    assert row["ratio"] == pytest.approx(row["ours_mb"] / row["torchvision_mb"])
    assert 0 < row["copy_extra_mb"] < 64  # the MobileNet backbone's folded copy, a few tens of MB
    assert "peak RSS mobilenet_v3_large_320_fpn float32" in out.getvalue()


@pytest.mark.parametrize("bad", ["800", "800x", "axb", "16x16"])
def test_bad_size_is_refused(bad):
    with pytest.raises(argparse.ArgumentTypeError, match="size"):
        peak_memory._size(bad)

"""The RoI ops index feature maps of more than 2^31 elements (torchvision's CPU kernels crash on them).

A [2, 16384, 256, 264] float map (2.2e9 elements, 8.9 GB) is allocated but never filled: the pages the kernels do
not read stay untouched, so the test writes only a window of every channel around the RoIs (about 1 GB resident).
The RoIs are in image 1, whose offsets all lie past 2^31, and inside the window, so pooling the window alone with
torchvision (RoIs shifted by its corner) gives the expected values.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import fasterrcnn_ext.ops as ops
from tests.ops.roi_inputs import CPU_POOL_KERNELS, cpu_pool_kernel

BATCH, CHANNELS, HEIGHT, WIDTH = 2, 2**14, 256, 264
Y0, Y1, X0, X1 = 100, 116, 200, 232  # the window that holds values; the RoIs lie inside it


@pytest.fixture(scope="module")
def huge_map():
    assert BATCH * CHANNELS * HEIGHT * WIDTH > 2**31
    try:
        features = torch.empty(BATCH, CHANNELS, HEIGHT, WIDTH)
    except RuntimeError as error:  # an allocator that refuses 8.9 GB of address space
        pytest.skip(f"cannot reserve a {BATCH}x{CHANNELS}x{HEIGHT}x{WIDTH} float map: {error}")
    window = torch.randn(1, CHANNELS, Y1 - Y0, X1 - X0, generator=torch.Generator().manual_seed(0))
    features[1:, :, Y0:Y1, X0:X1] = window
    # Outside the window the map is uninitialised: the RoIs, and the pixels they interpolate, stay inside it.
    boxes = torch.tensor([[203.0, 102.0, 229.0, 113.0], [210.5, 101.2, 220.7, 114.9], [200.0, 100.0, 231.0, 115.0]])
    rois = torch.cat([torch.ones(len(boxes), 1), boxes], 1)
    shifted = boxes - torch.tensor([X0, Y0, X0, Y0], dtype=torch.float32)
    yield features, rois, window, torch.cat([torch.zeros(len(boxes), 1), shifted], 1)
    del features


@pytest.mark.parametrize("sampling_ratio, aligned", [(2, True), (-1, False)])
def test_roi_align_past_2_31_elements(huge_map, sampling_ratio, aligned):
    features, rois, window, shifted = huge_map
    got = ops.roi_align(features, rois, 7, 1.0, sampling_ratio, aligned)
    expected = torchvision.ops.roi_align(window, shifted, 7, 1.0, sampling_ratio, aligned)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert got[:, -1].abs().sum() > 0  # the last channel, at the highest offsets, was read


@pytest.mark.parametrize("kernel", CPU_POOL_KERNELS)
def test_roi_pool_past_2_31_elements(huge_map, kernel):
    features, rois, window, shifted = huge_map
    with cpu_pool_kernel(kernel):
        values = ops.roi_pool(features, rois, 7, 1.0)
        got, argmax = torch.ops.fasterrcnn_ext.roi_pool(features, rois, 1.0, 7, 7)
    expected, expected_argmax = torch.ops.torchvision.roi_pool(window, shifted, 1.0, 7, 7)
    torch.testing.assert_close(values, expected, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # The argmax is a position in the channel's plane: the window's position moved by the window's corner.
    y, x = expected_argmax // (X1 - X0) + Y0, expected_argmax % (X1 - X0) + X0
    assert torch.equal(argmax.long(), y * WIDTH + x)


def test_multi_scale_roi_align_past_2_31_elements(huge_map):
    features, rois, window, shifted = huge_map
    pooler = ops.MultiScaleRoIAlign(["0"], 5, 2)
    got = pooler({"0": features}, [rois[:0, 1:], rois[:, 1:]], [(HEIGHT, WIDTH)] * 2)
    expected = torchvision.ops.roi_align(window, shifted, 5, 1.0, 2, False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)

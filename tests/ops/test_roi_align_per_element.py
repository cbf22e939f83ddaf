"""_roi_align_per_element: the CUDA RoIAlign forward's steps (csrc/ops/common/roi_align_per_element.h).

On the CPU its steps run one RoI at a time, as one CUDA block pools it, so these tests check the CUDA kernel's
arithmetic and table layout here; on a GPU they run the kernel itself. table_bytes picks the way: a RoI whose
sample table needs more bytes is pooled per element without one (0: every RoI).
"""

import pytest
import torch
import torchvision

import fasterrcnn_ext.ops as ops
from tests.ops.roi_inputs import random_rois

TOL = {torch.float32: dict(rtol=0, atol=2e-5), torch.float64: dict(rtol=0, atol=1e-10)}
# The CUDA kernel's shared memory for a table (roi_align_kernel.cu, kTableBytes); more is capped there.
KERNEL_TABLE_BYTES = 12 * 1024
TABLE_SIZES = [0, 700, KERNEL_TABLE_BYTES, 1 << 24]  # per element / mixed / the kernel's / every RoI by table


def per_element(features, rois, scales, output_size, sampling_ratio, aligned, table_bytes,
                canonical_scale=224.0, canonical_level=4.0):
    return torch.ops.fasterrcnn_ext._roi_align_per_element(
        features, rois, scales, output_size[0], output_size[1], sampling_ratio, aligned, canonical_scale,
        canonical_level, table_bytes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("table_bytes", TABLE_SIZES)
def test_matches_torchvision_roi_align(device, dtype, aligned, sampling_ratio, table_bytes):
    x = torch.randn(2, 5, 24, 30, dtype=dtype, device=device)
    # Sizes up to 120 pixels at scale 1/4: adaptive grids from 1 to 6 samples per bin side, so 700 bytes holds
    # the table of some RoIs and not of others.
    rois = random_rois(60, 2, image_hw=(96, 120), max_size=120.0, dtype=dtype, device=device)
    ours = per_element([x], rois, [0.25], (5, 4), sampling_ratio, aligned, table_bytes)
    theirs = torchvision.ops.roi_align(x, rois, (5, 4), 0.25, sampling_ratio, aligned)
    torch.testing.assert_close(ours, theirs, **TOL[dtype])


@pytest.mark.parametrize("sampling_ratio", [-1, 3])
def test_table_and_per_element_sum_the_same_products(device, sampling_ratio):
    """Both ways add the same products in the same order, and neither compiler contracts them into FMAs
    (-ffp-contract=off, --fmad=false in setup.py): the same bits."""
    x = torch.randn(2, 6, 20, 28, device=device)
    rois = random_rois(80, 2, image_hw=(40, 56), max_size=60.0, device=device)
    by_table = per_element([x], rois, [0.5], (7, 7), sampling_ratio, True, 1 << 24)
    by_element = per_element([x], rois, [0.5], (7, 7), sampling_ratio, True, 0)
    assert torch.equal(by_table, by_element)


@pytest.mark.parametrize("table_bytes", TABLE_SIZES)
def test_equals_our_roi_align(device, table_bytes):
    x = torch.randn(1, 32, 50, 84, device=device)
    rois = random_rois(300, 1, image_hw=(200, 336), min_size=4.0, max_size=300.0, device=device)
    ours = per_element([x], rois, [0.25], (7, 7), 2, True, table_bytes)
    torch.testing.assert_close(ours, ops.roi_align(x, rois, 7, 0.25, 2, True), rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("table_bytes", TABLE_SIZES)
def test_multi_level_matches_torchvision(device, dtype, table_bytes):
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    feats = [torch.randn(2, 4, 128 // (2 ** i), 96 // (2 ** i), dtype=dtype, device=device) for i in range(4)]
    boxes = [random_rois(40, 1, image_hw=(512, 384), min_size=8.0, max_size=500.0, dtype=dtype,
                         device=device)[:, 1:] for _ in range(2)]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=dtype, device=device), b], 1)
                      for i, b in enumerate(boxes)])
    ours = per_element(feats, rois, scales, (7, 7), 2, False, table_bytes)
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    theirs = pooler({str(i): f for i, f in enumerate(feats)}, boxes, [(512, 384)] * 2)
    torch.testing.assert_close(ours, theirs, **TOL[dtype])
    torch.testing.assert_close(ours, ops.multi_scale_roi_align(feats, rois, 7, scales, 2), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_accumulate_in_float32(device, dtype):
    x = torch.randn(1, 8, 16, 16, device=device).to(dtype)
    rois = random_rois(20, 1, image_hw=(16, 16), device=device).to(dtype)
    ours = per_element([x], rois, [1.0], (4, 4), 2, True, KERNEL_TABLE_BYTES)
    reference = torchvision.ops.roi_align(x.float(), rois.float(), 4, 1.0, 2, True)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.float(), reference, rtol=0, atol=float(torch.finfo(dtype).eps) * 4)


@pytest.mark.parametrize("table_bytes", TABLE_SIZES)
def test_nan_and_enormous_rois_give_roi_aligns_output(device, table_bytes):
    """The adaptive grid is capped: enormous RoIs need a table of ~2 * 7 * (2 * 32 + 2) samples, or none."""
    x = torch.randn(1, 4, 32, 32, device=device)
    rois = torch.tensor([[0, float("nan"), 0, 5, 5],
                         [0, -1e30, -1e30, 1e30, 1e30],
                         [0, 0, 0, 1e30, 1e30],
                         [0, float("inf"), 1, float("inf"), 3],
                         [0, 1, 1, 8, 8]], device=device)
    ours = per_element([x], rois, [1.0], (7, 7), -1, False, table_bytes)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ops.roi_align(x, rois, 7, 1.0, -1, False), rtol=0, atol=2e-5)


def test_inf_features_are_skipped_outside_the_map(device):
    """A sample outside the map contributes nothing, not 0 * inf (torchvision's CPU kernel gives NaN there, from a
    zero weight on pixel (0, 0)): the table leaves it out, as roi_align does."""
    x = torch.full((1, 1, 8, 8), float("inf"), device=device)
    x[..., 2:6, 2:6] = 1.0
    rois = torch.tensor([[0, 2.0, 2.0, 5.0, 5.0], [0, -30.0, -30.0, -20.0, -20.0]], device=device)
    for table_bytes in (0, KERNEL_TABLE_BYTES):
        out = per_element([x], rois, [1.0], (2, 2), 2, True, table_bytes)
        torch.testing.assert_close(out[:1], torchvision.ops.roi_align(x, rois[:1], 2, 1.0, 2, True))
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.equal(out, ops.roi_align(x, rois, 2, 1.0, 2, True))


def test_empty_rois(device):
    x = torch.randn(2, 3, 10, 10, device=device)
    out = per_element([x], torch.empty(0, 5, device=device), [1.0], (4, 5), 2, False, KERNEL_TABLE_BYTES)
    assert out.shape == (0, 3, 4, 5)


@pytest.mark.parametrize(
    "features, rois, scales, table_bytes, message",
    [
        ([torch.rand(2, 3, 8, 8)], torch.tensor([[2.0, 0, 0, 4, 4]]), [1.0], 0,
         r"rois\[0, 0\] = 2 is not a valid batch index"),
        ([torch.rand(2, 3, 8, 8)], torch.zeros(1, 5), [1.0], -1, r"table_bytes must be >= 0, got -1"),
        ([torch.rand(2, 3, 8, 8)], torch.zeros(1, 5), [1.0, 0.5], 0, r"got 1 feature maps and 2 scales"),
        ([torch.rand(2, 3, 8, 8)], torch.zeros(1, 5, dtype=torch.float64), [1.0], 0, r"same dtype"),
        ([torch.rand(2, 3, 8, 8)] * 9, torch.zeros(1, 5), [2.0 ** -i for i in range(9)], 0,
         r"at most 8 feature levels"),
    ],
)
def test_bad_input(features, rois, scales, table_bytes, message):
    with pytest.raises(RuntimeError, match=message):
        per_element(features, rois, scales, (2, 2), 2, False, table_bytes)


def test_opcheck(device):
    x = torch.randn(2, 3, 10, 12, device=device)
    rois = random_rois(6, 2, image_hw=(20, 24), device=device)
    for table_bytes in (0, KERNEL_TABLE_BYTES):
        torch.library.opcheck(torch.ops.fasterrcnn_ext._roi_align_per_element.default,
                              ([x], rois, [0.5], 3, 2, -1, True, 224.0, 4.0, table_bytes))

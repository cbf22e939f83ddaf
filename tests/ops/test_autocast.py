"""Under torch.autocast, half feature maps meet float32 boxes: the RoI ops take the pair as it is (the map read in
its dtype, pooled in float32, the result in its dtype), other dtypes run in float32 as torchvision's; NMS runs in
float32."""

import pytest
import torch

import fasterrcnn_ext.ops as ops
from tests.ops.roi_inputs import random_rois


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_roi_ops_under_autocast(device, dtype):
    x = torch.randn(2, 4, 16, 16, device=device)
    rois = random_rois(10, 2, image_hw=(32, 32), device=device)
    with torch.autocast(device_type=device, dtype=dtype):
        half = x.to(dtype)
        aligned = ops.roi_align(half, rois, 3, 0.5, 2, True)
        pooled = ops.roi_pool(half, rois, 3, 0.5)  # no gradient wanted: the op without the argmax
        pooled_for_training = ops.roi_pool(half.detach().requires_grad_(), rois, 3, 0.5)  # the op with it
        multi = ops.multi_scale_roi_align([half, half[:, :, ::2, ::2]], rois, 3, [0.5, 0.25], 2)
    assert aligned.dtype == pooled.dtype == pooled_for_training.dtype == multi.dtype == dtype
    assert torch.equal(pooled, pooled_for_training)
    torch.testing.assert_close(aligned.float(), ops.roi_align(half.float(), rois, 3, 0.5, 2, True),
                               rtol=0, atol=float(torch.finfo(dtype).eps) * 8)
    torch.testing.assert_close(pooled.float(), ops.roi_pool(half.float(), rois, 3, 0.5))
    # The half map with float32 boxes goes to the kernels as it is: the results without autocast.
    assert torch.equal(aligned, ops.roi_align(half, rois, 3, 0.5, 2, True))
    assert torch.equal(pooled, ops.roi_pool(half, rois, 3, 0.5))
    assert torch.equal(multi, ops.multi_scale_roi_align([half, half[:, :, ::2, ::2]], rois, 3, [0.5, 0.25], 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_roi_ops_under_autocast_cast_other_mixes_to_float32(device, dtype):
    """A float32 map with half boxes, or a pyramid of mixed dtypes, runs in float32 as torchvision's: the result in
    the (first) map's dtype."""
    x = torch.randn(2, 4, 16, 16, device=device)
    rois = random_rois(10, 2, image_hw=(32, 32), device=device)
    with torch.autocast(device_type=device, dtype=dtype):
        aligned = ops.roi_align(x, rois.to(dtype), 3, 0.5, 2, True)
        pooled = ops.roi_pool(x, rois.to(dtype), 3, 0.5)
        multi = ops.multi_scale_roi_align([x.to(dtype), x[:, :, ::2, ::2]], rois, 3, [0.5, 0.25], 2)
    assert aligned.dtype == pooled.dtype == torch.float32 and multi.dtype == dtype
    assert torch.equal(aligned, ops.roi_align(x, rois.to(dtype).float(), 3, 0.5, 2, True))
    assert torch.equal(pooled, ops.roi_pool(x, rois.to(dtype).float(), 3, 0.5))
    expected = ops.multi_scale_roi_align([x.to(dtype).float(), x[:, :, ::2, ::2]], rois, 3, [0.5, 0.25], 2)
    assert torch.equal(multi, expected.to(dtype))


def test_nms_under_autocast_with_mixed_dtypes(device):
    xy = torch.rand(100, 2, device=device) * 50
    boxes = torch.cat([xy, xy + 10], 1)
    scores = torch.rand(100, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        keep = ops.nms(boxes.to(torch.bfloat16), scores, 0.5)
        classes = torch.zeros(100, dtype=torch.long, device=device)
        keep_b = ops.batched_nms(boxes, scores.to(torch.bfloat16), classes, 0.5)
    expected = ops.nms(boxes.to(torch.bfloat16).float(), scores, 0.5)
    torch.testing.assert_close(keep, expected)
    assert keep_b.dtype == torch.int64


def test_roi_align_backward_under_autocast():
    x = torch.randn(1, 4, 16, 16, requires_grad=True)
    rois = random_rois(6, 1, image_hw=(16, 16))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = ops.roi_align(x.to(torch.bfloat16), rois, 3, 1.0, 2, True)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # The gradient of the bfloat16 map (summed in float32, rounded once), then cast back to float32.
    x2 = x.detach().to(torch.bfloat16).float().requires_grad_()
    ops.roi_align(x2, rois, 3, 1.0, 2, True).sum().backward()
    assert torch.equal(x.grad, x2.grad.to(torch.bfloat16).float())

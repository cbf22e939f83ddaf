import math

import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder

import fasterrcnn_ext.ops as ops
from fasterrcnn_ext.benchmark.inputs import random_boxes, rpn_like_boxes

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
EXACT = dict(rtol=0, atol=0)


def awkward_boxes(device, dtype=torch.float32):
    """Degenerate, inverted, huge and NaN/Inf boxes."""
    return torch.tensor([[0, 0, 0, 0], [5, 5, 2, 2], [1, 1, 1e7, 1e7], [-5, -5, 5, 5], [0, 0, float("nan"), 3],
                         [float("-inf"), 0, float("inf"), 4], [3, 3, 4, 4]], dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_iou_matches_torchvision(device, dtype):
    a, b = rpn_like_boxes(300, dtype=dtype, device=device), random_boxes(200, dtype=dtype, device=device)
    torch.testing.assert_close(ops.box_iou(a, b), torchvision.ops.box_iou(a, b), **EXACT)
    w = awkward_boxes(device, dtype)
    torch.testing.assert_close(ops.box_iou(w, w), torchvision.ops.box_iou(w, w), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_box_iou_half_types_in_float32(device, dtype):
    a, b = random_boxes(50, dtype=dtype, device=device), random_boxes(40, dtype=dtype, device=device)
    out = ops.box_iou(a, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torchvision.ops.box_iou(a.float(), b.float()), **EXACT)


@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                    (torch.float16, torch.float32), (torch.bfloat16, torch.float16),
                                    (torch.float16, torch.float64)], ids=str)
def test_box_iou_promotes_mixed_floating_dtypes_as_torchvision(device, dtypes):
    """torchvision's box_iou is tensor arithmetic, so two dtypes promote (a detector given float64 ground truth
    compares it with float32 anchors): ours promotes them to the same dtype and gives torchvision's values."""
    a = random_boxes(30, dtype=torch.float64, device=device).to(dtypes[0])
    b = random_boxes(20, dtype=torch.float64, device=device).to(dtypes[1])
    out, expected = ops.box_iou(a, b), torchvision.ops.box_iou(a, b)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_box_iou_empty_and_opcheck(device):
    assert ops.box_iou(torch.empty(0, 4, device=device), random_boxes(3, device=device)).shape == (0, 3)
    torch.library.opcheck(torch.ops.fasterrcnn_ext.box_iou.default,
                          (random_boxes(5, device=device), random_boxes(7, device=device)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clip_matches_torchvision(device, dtype):
    boxes = (torch.randn(3, 50, 4, device=device) * 300).to(dtype)
    torch.testing.assert_close(ops.clip_boxes_to_image(boxes, (100, 150)),
                               torchvision.ops.clip_boxes_to_image(boxes, (100, 150)), **EXACT)
    w = awkward_boxes(device, dtype)
    torch.testing.assert_close(ops.clip_boxes_to_image(w, (10, 20)), torchvision.ops.clip_boxes_to_image(w, (10, 20)),
                               rtol=0, atol=0, equal_nan=True)
    nc = boxes[:, ::2]
    torch.testing.assert_close(ops.clip_boxes_to_image(nc, (7, 9)), torchvision.ops.clip_boxes_to_image(nc, (7, 9)))
    torch.library.opcheck(torch.ops.fasterrcnn_ext.clip_boxes_to_image.default, (boxes, 100, 150))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_remove_small_boxes_matches_torchvision(device, dtype):
    boxes = torch.cat([random_boxes(300, dtype=dtype, device=device) * torch.rand(300, 1, device=device).to(dtype),
                       awkward_boxes(device, dtype)])
    for min_size in (0.0, 1e-3, 1.0, 5.0):
        torch.testing.assert_close(ops.remove_small_boxes(boxes, min_size),
                                   torchvision.ops.remove_small_boxes(boxes, min_size), **EXACT)
    torch.library.opcheck(torch.ops.fasterrcnn_ext.remove_small_boxes.default, (boxes, 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_match_boxcoder(device, dtype, weights):
    coder = BoxCoder(weights)
    proposals = rpn_like_boxes(500, dtype=dtype, device=device)
    reference = rpn_like_boxes(500, dtype=dtype, device=device)
    codes = ops.encode_boxes(reference, proposals, weights)
    torch.testing.assert_close(codes, coder.encode_single(reference, proposals))
    # Per-class codes [N, 4 * C], including clamped dw/dh.
    rel = torch.randn(500, 4 * 7, dtype=dtype, device=device) * 3
    rel[::5, 2] = 50.0
    ours = ops.decode_boxes(rel, proposals, weights)
    # exp() may differ from torch.exp's vectorised one by an ulp, which the box size then scales.
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(ours, coder.decode_single(rel, proposals), **tol)
    # The round trip.
    torch.testing.assert_close(ops.decode_boxes(codes, proposals, weights), reference,
                               rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=1e-3 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half_types_compute_in_float32(device, dtype):
    proposals = rpn_like_boxes(100, device=device).to(dtype)
    rel = (torch.randn(100, 4, device=device) * 0.5).to(dtype)
    out = ops.decode_boxes(rel, proposals, (1, 1, 1, 1))
    assert out.dtype == dtype
    expected = BoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(rel.float(), proposals.float()).to(dtype)
    torch.testing.assert_close(out, expected)


def test_decode_nan_and_inf_deltas_stay_defined(device):
    boxes = torch.tensor([[0, 0, 10, 10.0]] * 4, device=device)
    rel = torch.tensor([[float("nan"), 0, 0, 0], [0, 0, float("inf"), 0], [0, 0, float("-inf"), 0], [1e30, 0, 0, 0]],
                       device=device)
    ours = ops.decode_boxes(rel, boxes, (1, 1, 1, 1))
    torch.testing.assert_close(ours, BoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(rel, boxes), equal_nan=True)
    assert torch.isfinite(ours[1]).all()  # +inf dw is clamped to log(1000/16)


def test_box_coder_bad_input():
    with pytest.raises(RuntimeError, match=r"weights must have 4 values \(wx, wy, ww, wh\), got 3"):
        ops.decode_boxes(torch.rand(3, 4), torch.rand(3, 4), (1.0, 1.0, 1.0))
    with pytest.raises(RuntimeError, match=r"rel_codes must be a \[N, 4 \* C\] tensor, got shape \[3, 5\]"):
        ops.decode_boxes(torch.rand(3, 5), torch.rand(3, 4), (1.0, 1.0, 1.0, 1.0))
    with pytest.raises(RuntimeError, match=r"same length, got 3 and 2"):
        ops.decode_boxes(torch.rand(3, 4), torch.rand(2, 4), (1.0, 1.0, 1.0, 1.0))
    with pytest.raises(RuntimeError, match=r"weights must have 4 values"):
        ops.encode_boxes(torch.rand(3, 4), torch.rand(3, 4), (1.0,))
    with pytest.raises(RuntimeError, match=r"boxes must be a \[\.\.\., 4\] tensor"):
        ops.clip_boxes_to_image(torch.rand(3, 5), (4, 4))


def test_box_coder_opcheck(device):
    p, r = rpn_like_boxes(20, device=device), rpn_like_boxes(20, device=device)
    torch.library.opcheck(torch.ops.fasterrcnn_ext.encode_boxes.default, (r, p, [1.0, 1.0, 1.0, 1.0]))
    torch.library.opcheck(torch.ops.fasterrcnn_ext.decode_boxes.default,
                          (torch.randn(20, 8, device=device), p, [10.0, 10.0, 5.0, 5.0], math.log(1000 / 16)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_box_math_cpu_equals_cuda():
    """The shared box math, compiled for both, gives the same bits (encode: the same up to its log)."""
    p, r = rpn_like_boxes(2000), rpn_like_boxes(2000)
    rel = torch.randn(2000, 12)
    w = (10.0, 10.0, 5.0, 5.0)
    torch.testing.assert_close(ops.decode_boxes(rel.cuda(), p.cuda(), w).cpu(), ops.decode_boxes(rel, p, w), **EXACT)
    # encode's log is each platform's own (CPU libm, CUDA logf), both within 1 ulp: at most 2 ulp apart.
    torch.testing.assert_close(ops.encode_boxes(r.cuda(), p.cuda(), w).cpu(), ops.encode_boxes(r, p, w),
                               rtol=2.5e-7, atol=1e-7)
    torch.testing.assert_close(ops.box_iou(r.cuda(), p.cuda()).cpu(), ops.box_iou(r, p), **EXACT)


def test_decode_exp_accuracy_and_limits(device):
    """decode_boxes' exp (a vectorisable polynomial shared by CPU and CUDA) is within 2 ulp of the true exp, and
    keeps NaN, overflow and underflow as exp does."""
    x = torch.linspace(-20, 88, 200_001, device=device)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device).expand(len(x), 4).contiguous()
    rel = torch.zeros(len(x), 4, device=device)
    rel[:, 2] = x
    out = ops.decode_boxes(rel, boxes, (1, 1, 1, 1), bbox_xform_clip=1e9)
    width = out[:, 2].double().cpu() * 2 - 1  # x2 = 0.5 + exp(x) / 2
    ref = torch.exp(x.double().cpu())
    big = ref > 1e4  # where the subtraction above loses nothing
    assert ((width[big] - ref[big]) / ref[big]).abs().max() < 2.5e-7
    special = torch.tensor([[0, 0, float("nan"), 0], [0, 0, 100.0, 0], [0, 0, -200.0, 0]], device=device)
    out = ops.decode_boxes(special, boxes[:3], (1, 1, 1, 1), bbox_xform_clip=1e9).cpu()
    assert out[0, 0].isnan() and out[1, 2] == float("inf") and out[2, 0] == out[2, 2] == 0.5


def test_constants_agree_with_the_kernels():
    """ops/constants.py and csrc/ops/common/constants.h hold the same values: the decode clamp, and the FPN rule's
    defaults in the multi_scale_roi_align schema."""
    from fasterrcnn_ext.ops.constants import BBOX_XFORM_CLIP, CANONICAL_LEVEL, CANONICAL_SCALE

    assert BBOX_XFORM_CLIP == math.log(1000.0 / 16)
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]], dtype=torch.float64)
    codes = torch.tensor([[0.0, 0.0, 100.0, 100.0]], dtype=torch.float64)  # clamped at BBOX_XFORM_CLIP
    decoded = ops.decode_boxes(codes, anchor, (1.0, 1.0, 1.0, 1.0))[0]
    width, height = decoded[2] - decoded[0], decoded[3] - decoded[1]
    torch.testing.assert_close(width.item(), 10.0 * math.exp(BBOX_XFORM_CLIP), rtol=1e-12, atol=0)
    torch.testing.assert_close(height.item(), 20.0 * math.exp(BBOX_XFORM_CLIP), rtol=1e-12, atol=0)
    schema = torch.ops.fasterrcnn_ext.multi_scale_roi_align.default._schema
    defaults = {a.name: a.default_value for a in schema.arguments}
    assert defaults["canonical_scale"] == CANONICAL_SCALE and defaults["canonical_level"] == CANONICAL_LEVEL

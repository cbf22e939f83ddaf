"""Quantized tensors in the ops, as torchvision takes them: roi_align and nms accept per-tensor quantized quint8, qint8
and qint32 inputs (QuantizedCPU kernels) with torchvision's results; roi_pool, like torchvision's, does not."""

import warnings

import pytest
import torch
import torchvision

import fasterrcnn_ext.ops as ops

QDTYPES = [torch.quint8, torch.qint8, torch.qint32]


@pytest.fixture(autouse=True)
def _quiet_quantization_deprecation():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantize.*deprecated.*")
        yield


def quantize(t, scale, dtype):
    """t quantized per tensor; a zero point inside every dtype's range that is not 0 (qint8 is signed)."""
    zero_point = 0 if dtype == torch.qint8 else 3
    return torch.quantize_per_tensor(t, scale, zero_point, dtype)


def quantized_rois(k, height, width, dtype, scale=0.25, seed=0):
    """[K, 5] rois of image 0 on a 1/scale grid, some partly outside the map and some degenerate."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g) * torch.tensor([width, height]) - 3
    wh = torch.rand(k, 2, generator=g) * 20 - 2
    rois = torch.cat([torch.zeros(k, 1), xy, xy + wh], 1).clamp(min=0)  # quint8 holds no negative coordinates
    return quantize(rois, scale, dtype)


@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_equals_torchvisions_quantized_result(dtype, aligned, sampling_ratio):
    g = torch.Generator().manual_seed(1)
    x = quantize(torch.randn(1, 5, 13, 17, generator=g) * 2, 0.05, dtype)
    rois = quantized_rois(60, 13 * 2, 17 * 2, dtype)
    kw = dict(output_size=(3, 4), spatial_scale=0.5, sampling_ratio=sampling_ratio, aligned=aligned)
    ours = ops.roi_align(x, rois, **kw)
    theirs = torchvision.ops.roi_align(x, rois, **kw)
    assert ours.dtype == dtype and ours.is_quantized
    assert (ours.q_scale(), ours.q_zero_point()) == (theirs.q_scale(), theirs.q_zero_point())
    assert torch.equal(ours.int_repr(), theirs.int_repr())
    # The values: the float kernel on the dequantized map, requantized (up to float32 rounding at .5 steps).
    reference = ops.roi_align(x.dequantize(), rois.dequantize(), **kw)
    assert (ours.dequantize() - reference).abs().max() <= 0.05 * 0.5 + 1e-4


def test_roi_align_quantized_non_contiguous_input_and_box_list():
    x = quantize(torch.randn(1, 8, 12, 12) * 2, 0.05, torch.quint8)
    strided = x[:, ::2]
    assert not strided.is_contiguous()
    rois = quantized_rois(20, 24, 24, torch.quint8)
    assert torch.equal(ops.roi_align(strided, rois, 2, 0.5).int_repr(),
                       torchvision.ops.roi_align(strided, rois, 2, 0.5).int_repr())
    boxes = [quantize(rois.dequantize()[:, 1:], 0.25, torch.quint8)]
    assert torch.equal(ops.roi_align(x, boxes, 2, 0.5).int_repr(), ops.roi_align(x, rois, 2, 0.5).int_repr())


def test_roi_align_quantized_empty():
    x = quantize(torch.randn(1, 3, 8, 8), 0.1, torch.quint8)
    out = ops.roi_align(x, quantize(torch.zeros(0, 5), 0.25, torch.quint8), (2, 3))
    assert out.shape == (0, 3, 2, 3) and out.dtype == torch.quint8 and out.q_scale() == x.q_scale()
    none = quantize(torch.zeros(1, 0, 8, 8), 0.1, torch.quint8)
    assert ops.roi_align(none, quantized_rois(4, 8, 8, torch.quint8), 2).shape == (4, 0, 2, 2)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.quantize_per_tensor(torch.rand(1, 2, 8, 8), 0.1, 0, torch.quint4x2),
                  quantize(torch.zeros(1, 5), 0.25, torch.quint8)), r"quantized input must be quint8, qint8 or qint32"),
        (lambda: (quantize(torch.rand(1, 2, 8, 8), 0.1, torch.quint8), torch.zeros(1, 5)),
         r"rois of a quantized input must be quantized to its dtype \(QUInt8\), got Float"),
        (lambda: (quantize(torch.rand(1, 2, 8, 8), 0.1, torch.quint8), quantize(torch.zeros(1, 5), 0.25, torch.qint8)),
         r"rois of a quantized input must be quantized to its dtype \(QUInt8\), got QInt8"),
        (lambda: (torch.rand(1, 2, 8, 8), quantize(torch.zeros(1, 5), 0.25, torch.quint8)),
         r"quantized rois need a quantized input of their dtype, got input dtype Float"),
        (lambda: (quantize(torch.rand(2, 2, 8, 8), 0.1, torch.quint8), quantize(torch.zeros(1, 5), 0.25, torch.quint8)),
         r"a quantized input must hold one image \(N = 1"),
        (lambda: (quantize(torch.rand(1, 2, 8, 8), 0.1, torch.quint8),
                  quantize(torch.tensor([[1.0, 0, 0, 4, 4]]), 0.25, torch.quint8)),
         r"rois\[0, 0\] = 1 is not a valid batch index"),
        (lambda: (torch.quantize_per_channel(torch.rand(1, 2, 8, 8), torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), 1,
                                             torch.quint8), quantize(torch.zeros(1, 5), 0.25, torch.quint8)),
         r"quantized input must be quantized per tensor"),
    ],
)
def test_roi_align_quantized_bad_input(make, message):
    x, rois = make()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fasterrcnn_ext.roi_align(x, rois, 1.0, 2, 2, -1, False)


def quantized_boxes(n, dtype, seed):
    """Boxes on a coarse grid with many tied scores (a quantized score takes few values)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 40
    wh = torch.rand(n, 2, generator=g) * 20 + 1
    boxes = quantize(torch.cat([xy, xy + wh], 1), 0.5, dtype)
    scores = quantize(torch.rand(n, generator=g), 0.05, dtype)
    return boxes, scores


@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize("iou_threshold", [0.2, 0.5, 0.8])
def test_nms_equals_torchvisions_quantized_result(dtype, iou_threshold):
    for seed in range(5):
        boxes, scores = quantized_boxes(300, dtype, seed)
        ours = ops.nms(boxes, scores, iou_threshold)
        theirs = torchvision.ops.nms(boxes, scores, iou_threshold)
        assert torch.equal(ours, theirs), seed
        assert torch.equal(ops.nms(boxes, scores, iou_threshold, max_keep=7), theirs[:7])
        assert torch.equal(torch.ops.fasterrcnn_ext.nms(boxes, scores, iou_threshold), theirs)


def test_nms_quantized_empty_and_degenerate():
    empty = quantize(torch.zeros(0, 4), 0.5, torch.quint8)
    assert ops.nms(empty, quantize(torch.zeros(0), 0.1, torch.quint8), 0.5).shape == (0,)
    # Degenerate boxes (x2 < x1: negative area) and identical boxes, as torchvision handles them.
    boxes = quantize(torch.tensor([[5.0, 5, 1, 1], [0, 0, 4, 4], [0, 0, 4, 4], [2, 2, 2, 2]]), 0.5, torch.quint8)
    scores = quantize(torch.tensor([0.9, 0.5, 0.5, 0.7]), 0.1, torch.quint8)
    assert torch.equal(ops.nms(boxes, scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (quantize(torch.rand(3, 4), 0.5, torch.quint8), torch.rand(3)),
         r"quantized boxes and scores must be quantized to the same dtype, got QUInt8 and Float"),
        (lambda: (quantize(torch.rand(3, 4), 0.5, torch.quint8), quantize(torch.rand(3), 0.1, torch.qint8)),
         r"same dtype, got QUInt8 and QInt8"),
        (lambda: (torch.quantize_per_tensor(torch.rand(3, 4), 0.5, 0, torch.quint4x2),
                  torch.quantize_per_tensor(torch.rand(3), 0.5, 0, torch.quint4x2)),
         r"quantized boxes must be quint8, qint8 or qint32, got QUInt4x2"),
        (lambda: (quantize(torch.rand(3, 5), 0.5, torch.quint8), quantize(torch.rand(3), 0.1, torch.quint8)),
         r"boxes must be a \[N, 4\] tensor"),
        (lambda: (quantize(torch.rand(3, 4), 0.5, torch.quint8), quantize(torch.rand(2), 0.1, torch.quint8)),
         r"boxes and scores must have the same length"),
    ],
)
def test_nms_quantized_bad_input(make, message):
    boxes, scores = make()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fasterrcnn_ext.nms(boxes, scores, 0.5)


def test_roi_pool_refuses_quantized_input_as_torchvision():
    x = quantize(torch.rand(1, 2, 8, 8), 0.1, torch.quint8)
    rois = quantize(torch.tensor([[0.0, 0, 0, 4, 4]]), 0.25, torch.quint8)
    with pytest.raises(NotImplementedError, match=r"roi_pool: quantized input \(torch.quint8\) is not supported"):
        ops.roi_pool(x, rois, 2)
    with pytest.raises(NotImplementedError):
        torchvision.ops.roi_pool(x, rois, 2)

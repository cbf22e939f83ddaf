"""Every CPU op gives the same bits whatever the number of threads.

The CPU kernels split their work with at::parallel_for (boxes in chunks of 2,048 or 4,096, one class, image,
level or channel block per task). A chunk boundary in the wrong place, a race on a shared buffer or a reduction whose
order follows the thread count would show here as a difference between 1, 2, 3 and 5 threads (3 and 5 do not divide
the work evenly). The inputs are large enough to make several chunks and hold NaN, Inf and degenerate boxes.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

import fasterrcnn_ext.ops as ops
from fasterrcnn_ext.benchmark.inputs import random_boxes
from fasterrcnn_ext.models.detection import AnchorGenerator
from tests.ops.roi_inputs import CPU_POOL_KERNELS, cpu_pool_kernel, random_rois

THREAD_COUNTS = (1, 2, 3, 5)
IMAGE_SIZES = [(400, 480), (380, 450)]
LEVELS = [(100, 120), (50, 60), (25, 30), (13, 15), (7, 8)]  # an FPN over a 400x480 batch


@contextlib.contextmanager
def num_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def mixed_boxes(n, g, extent=400.0, specials=True):
    boxes = random_boxes(n, extent, generator=g)
    if specials:  # a few NaN, Inf and inverted boxes among the others
        boxes[7, 1] = math.nan
        boxes[11, 2] = math.inf
        boxes[13, 2:] = boxes[13, :2] - 1
    return boxes


def flat(outputs):
    """A tuple of tensors from an op's output (tensors, lists and tuples of them)."""
    if isinstance(outputs, torch.Tensor):
        return (outputs,)
    return tuple(t for item in outputs for t in flat(item))


def box_ops(g):
    boxes, other = mixed_boxes(10_000, g), mixed_boxes(10_000, g, specials=False)
    deltas = torch.randn(10_000, 4, generator=g)
    return lambda: (ops.box_iou(boxes[:3000], other[:200]), ops.clip_boxes_to_image(boxes, (300, 350)),
                    ops.remove_small_boxes(boxes, 30.0), ops.encode_boxes(other, boxes, (10.0, 10.0, 5.0, 5.0)),
                    ops.decode_boxes(deltas, other, (1.0, 1.0, 1.0, 1.0)))


def nms(g):
    boxes, scores = mixed_boxes(12_000, g), torch.rand(12_000, generator=g)
    scores[3] = math.nan
    labels = torch.randint(0, 80, (12_000,), generator=g)
    return lambda: (ops.nms(boxes, scores, 0.5), ops.nms(boxes, scores, 0.7, max_keep=300),
                    ops.batched_nms(boxes, scores, labels, 0.5))


def anchors(g):
    generator = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    images = ImageList(torch.zeros(2, 3, 400, 480), IMAGE_SIZES)
    features = [torch.zeros(2, 1, h, w) for h, w in LEVELS]
    return lambda: generator(images, features)


def rpn_proposals(g):
    per_level = [3 * h * w for h, w in LEVELS]
    objectness = torch.randn(2, sum(per_level), generator=g)
    deltas = torch.randn(2, sum(per_level), 4, generator=g) * 0.5
    anchor_boxes = mixed_boxes(sum(per_level), g, specials=False)
    return lambda: (ops.rpn_proposals(objectness, deltas, anchor_boxes, per_level, IMAGE_SIZES, 1000, 500, 0.7),
                    ops.rpn_proposals_padded(objectness, deltas, anchor_boxes, per_level, IMAGE_SIZES, 1000, 500,
                                             0.7))


def detection_postprocess(g):
    logits, regression = torch.randn(1500, 91, generator=g), torch.randn(1500, 91 * 4, generator=g) * 0.3
    proposals = mixed_boxes(1500, g, specials=False)
    counts = torch.tensor([900, 600])  # the padded layout: 900 rows per image, of which image 1 fills 600
    padded = torch.zeros(2, 900, 4)
    padded[0], padded[1, :600] = proposals[:900], proposals[900:]
    pad = torch.zeros(300, 91)
    padded_logits, padded_regression = torch.cat([logits, pad]), torch.cat([regression, pad.repeat(1, 4)])
    return lambda: (ops.detection_postprocess(logits, regression, [proposals[:900], proposals[900:]], IMAGE_SIZES,
                                              score_thresh=0.01),
                    ops.detection_postprocess_padded(padded_logits, padded_regression, padded, counts, IMAGE_SIZES,
                                                     score_thresh=0.01))


def roi_align(g):
    features = torch.randn(2, 48, 50, 60, generator=g)
    rois = random_rois(2000, 2, image_hw=(400, 480), max_size=200.0)
    rois[5, 1] = math.nan
    last = features.contiguous(memory_format=torch.channels_last)
    return lambda: (ops.roi_align(features, rois, 7, 1 / 8, 2, True), ops.roi_align(last, rois, 7, 1 / 8, -1, False),
                    ops.roi_align(features.double(), rois.double(), (5, 3), 1 / 8, 0, True))


def roi_pool(g):
    features = torch.randn(2, 48, 50, 60, generator=g)
    rois = random_rois(2000, 2, image_hw=(400, 480), max_size=200.0)
    rois[5, 1] = math.nan
    # The inference op (values only) and the training op (values and argmax).
    return lambda: (ops.roi_pool(features, rois, 7, 1 / 8), torch.ops.fasterrcnn_ext.roi_pool(features, rois, 1 / 8,
                                                                                             7, 7))


def roi_backward(g):
    features = torch.randn(2, 32, 50, 60, generator=g, requires_grad=True)
    rois = random_rois(1500, 2, image_hw=(400, 480), max_size=200.0)

    def grads():
        features.grad = None
        ops.roi_pool(features, rois, 7, 1 / 8).pow(2).sum().backward()
        pool_grad = features.grad.clone()
        features.grad = None
        ops.roi_align(features, rois, 7, 1 / 8, 2, True).pow(2).sum().backward()
        return pool_grad, features.grad.clone()
    return grads


def multi_scale_roi_align(g):
    features = {str(i): torch.randn(2, 32, h, w, generator=g) for i, (h, w) in enumerate(LEVELS[:4])}
    boxes = [mixed_boxes(1200, g, specials=False), mixed_boxes(800, g, specials=False)]
    pooler = ops.MultiScaleRoIAlign(list(features), 7, 2)
    return lambda: pooler(features, boxes, IMAGE_SIZES)


def conv3x3_winograd(g):
    x = torch.randn(1, 40, 37, 45, generator=g).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(24, 40, 3, 3, generator=g), torch.randn(24, generator=g)
    packed = ops.winograd_weight(weight)
    return lambda: ops.conv3x3_winograd(x, packed, bias, relu=True)


CASES = [box_ops, nms, anchors, rpn_proposals, detection_postprocess, roi_align, roi_pool, roi_backward,
         multi_scale_roi_align, conv3x3_winograd]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_same_bits_with_any_thread_count(case):
    run = case(torch.Generator().manual_seed(0))
    kernels = CPU_POOL_KERNELS if case in (roi_pool, roi_backward) else ["default"]
    for kernel in kernels:
        with contextlib.nullcontext() if kernel == "default" else cpu_pool_kernel(kernel):
            results = {}
            for n in THREAD_COUNTS:
                with num_threads(n):
                    results[n] = flat(run())
        first = results[THREAD_COUNTS[0]]
        assert sum(t.numel() for t in first) > 0
        for n in THREAD_COUNTS[1:]:
            assert len(results[n]) == len(first)
            for i, (got, expected) in enumerate(zip(results[n], first)):
                where = f"{kernel} kernel, {n} threads, output {i}"
                assert got.shape == expected.shape and got.dtype == expected.dtype, where
                # Exact: no tolerance, NaN where NaN was.
                assert torch.equal(got.isnan(), expected.isnan()), where
                assert torch.equal(got[~got.isnan()], expected[~expected.isnan()]), where

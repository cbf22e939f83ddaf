"""ONNX export with the torch.export-based exporter (torch.onnx.export(..., dynamo=True)): each op's onnxscript
translation (ops/_onnxscript.py) run by onnxruntime gives the op's results, and the whole detector, exported with a
dynamic image size, gives the detections of the TorchScript-based export and of our PyTorch model."""

import io

import pytest
import torch

import fasterrcnn_ext.ops as ops
from fasterrcnn_ext.benchmark.inputs import random_boxes
from fasterrcnn_ext.engine.export import export_onnx
from fasterrcnn_ext.models import detection as ours
from fasterrcnn_ext.ops._onnxscript import onnx_translations

from .test_export import eager_detections, spread_tiny
from .test_faster_rcnn import BUILDERS, assert_same_detections, small_model
from .test_onnx import (
    IMAGE_SIZES,
    Fn,
    assert_twins_across_runtimes,
    detections,
    import_openvino,
    op_types,
    openvino_compile,
    run,
)

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")


def export_op(fn, args, dynamic) -> bytes:
    """``fn`` exported with every listed dimension dynamic ({input index: [dims]})."""
    shapes = tuple({d: torch.export.Dim.DYNAMIC for d in dynamic.get(i, [])} or None for i in range(len(args)))
    program = torch.onnx.export(Fn(fn).eval(), args, dynamo=True, custom_translation_table=onnx_translations(),
                                dynamic_shapes=(shapes,), verbose=False)  # forward(*args): one entry
    return program.model_proto.SerializeToString()


def test_nms_and_batched_nms():
    g = torch.Generator().manual_seed(0)
    boxes, scores = random_boxes(300, 100.0, generator=g), torch.rand(300, generator=g)
    idxs = torch.randint(0, 4, (300,), generator=g)
    nms = export_op(lambda b, s: ops.nms(b, s, 0.5), (boxes, scores), {0: [0], 1: [0]})
    batched = export_op(lambda b, s, i: ops.batched_nms(b, s, i, 0.5), (boxes, scores, idxs), {0: [0], 1: [0], 2: [0]})
    assert "NonMaxSuppression" in op_types(nms) and not any(t.startswith("fasterrcnn") for t in op_types(batched))
    for n in (300, 57):  # another size: the graph is dynamic
        b, s, i = boxes[:n] - 30, scores[:n], idxs[:n]  # negative coordinates too
        assert torch.equal(run(nms, b, s)[0], ops.nms(b, s, 0.5))
        assert torch.equal(run(batched, b, s, i)[0], ops.batched_nms(b, s, i, 0.5))


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_and_multi_scale_roi_align(aligned):
    g = torch.Generator().manual_seed(1)
    feats = [torch.rand(2, 8, 64 // 2**k, 80 // 2**k, generator=g) for k in range(4)]
    rois = torch.cat([torch.randint(0, 2, (40, 1), generator=g).float(), random_boxes(40, 150.0, generator=g)], 1)
    rois[:5, 3:] = rois[:5, 1:3] + 300  # large RoIs: the coarsest level
    scales = [0.25, 0.125, 0.0625, 0.03125]
    single = export_op(lambda x, r: ops.roi_align(x, r, 7, 0.25, 2, aligned), (feats[0], rois), {0: [2, 3], 1: [0]})
    multi = export_op(lambda a, b, c, d, r: torch.ops.fasterrcnn_ext.multi_scale_roi_align(
        [a, b, c, d], r, scales, 7, 7, 2, aligned), (*feats, rois), {4: [0]})
    torch.testing.assert_close(run(single, feats[0], rois)[0], ops.roi_align(feats[0], rois, 7, 0.25, 2, aligned),
                               rtol=1e-5, atol=1e-5)
    expected = torch.ops.fasterrcnn_ext.multi_scale_roi_align(feats, rois[:30], scales, 7, 7, 2, aligned)
    torch.testing.assert_close(run(multi, *feats, rois[:30])[0], expected, rtol=1e-5, atol=1e-5)


def test_roi_pool():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 4, 30, 40, generator=g)
    rois = torch.cat([torch.zeros(20, 1), random_boxes(20, 300.0, generator=g)], 1)
    with torch.no_grad():  # RoIPool's argmax (for backward) has no ONNX form
        model = export_op(lambda a, r: ops.roi_pool(a, r, 7, 1 / 16), (x, rois), {1: [0]})
    assert "MaxRoiPool" in op_types(model)
    torch.testing.assert_close(run(model, x, rois[:13])[0], ops.roi_pool(x, rois[:13], 7, 1 / 16))


def test_anchor_grid():
    cells = [ours.AnchorGenerator.generate_anchors((32,), (0.5, 1.0, 2.0)),
             ours.AnchorGenerator.generate_anchors((64, 128), (0.5, 1.0, 2.0))]

    def grid(a, b):  # the grid sizes come from the inputs' shapes: symbolic in the graph
        return torch.ops.fasterrcnn_ext.anchor_grid(cells, [a.size(0), a.size(1), b.size(0), b.size(1)], [4, 4, 8, 8])

    model = export_op(grid, (torch.zeros(10, 12), torch.zeros(5, 6)), {0: [0, 1], 1: [0, 1]})
    for a, b in [((10, 12), (5, 6)), ((7, 3), (4, 2))]:
        args = (torch.zeros(*a), torch.zeros(*b))
        assert torch.equal(run(model, *args)[0], grid(*args))


@pytest.mark.parametrize("rpn_coder, heads_coder", [
    ({}, {}),  # torchvision's box coders
    (dict(weights=(2.0, 2.0, 0.5, 0.5), bbox_xform_clip=0.2), dict(weights=(5.0, 5.0, 2.0, 2.0), bbox_xform_clip=0.1))],
    ids=["default_coders", "other_coders"])
def test_rpn_proposals_and_detection_postprocess_with_split(rpn_coder, heads_coder):
    """The fused post-processing ops and the per-image split against the kernels, on two images with distinct scores
    (exact ties may order differently, see ops/_onnxscript.py), with torchvision's box coders and with others (exp
    clamps that the deltas pass)."""
    g = torch.Generator().manual_seed(3)
    levels = [300, 80]
    anchors = random_boxes(sum(levels), 200.0, generator=g)
    objectness, deltas = torch.randn(2, sum(levels), generator=g) * 3, torch.randn(2, sum(levels), 4, generator=g) * .2
    sizes = [(180, 200), (150, 210)]

    def proposals(o, d, a):
        boxes, scores = ops.rpn_proposals(o, d, a, levels, sizes, 100, 60, 0.7, 0.0, 1e-3, **rpn_coder)
        return (*boxes, *scores)

    model = export_op(proposals, (objectness, deltas, anchors), {})
    for got, expected in zip(run(model, objectness, deltas, anchors), proposals(objectness, deltas, anchors)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)

    logits, regression = torch.randn(90, 5, generator=g) * 3, torch.randn(90, 20, generator=g) * 0.3
    props = [random_boxes(50, 150.0, generator=g), random_boxes(40, 150.0, generator=g)]

    def postprocess(c, r, p0, p1):
        boxes, scores, labels = ops.detection_postprocess(c, r, [p0, p1], sizes, score_thresh=0.2, nms_thresh=0.5,
                                                          detections_per_img=30, **heads_coder)
        return (*boxes, *scores, *labels)

    model = export_op(postprocess, (logits, regression, *props), {0: [0], 1: [0], 2: [0], 3: [0]})
    for n0, n1 in [(50, 40), (31, 12)]:
        args = (torch.cat([logits[:n0], logits[50:50 + n1]]), torch.cat([regression[:n0], regression[50:50 + n1]]),
                props[0][:n0], props[1][:n1])
        expected = postprocess(*args)
        assert len(expected[0]) > 0
        for got, want in zip(run(model, *args), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def export_detector(model, image, dynamo) -> bytes:
    f = io.BytesIO()
    export_onnx(model, image, f, dynamo=dynamo)
    return f.getvalue()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "resnet" in n else n
                                  for n in BUILDERS + ["fasterrcnn_vgg16"]])
def test_detector_equals_the_torchscript_based_export(name):
    """The same weights through both exporters, both run by onnxruntime, on two image sizes (one resized and padded:
    the dynamo graph computes the resize from the image size)."""
    mine = small_model(name, box_score_thresh=0.05, box_detections_per_img=1000).eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g) for h, w in IMAGE_SIZES]
    model, reference = export_detector(mine, images[0], True), export_detector(mine, images[0], False)
    assert not any(t.startswith("fasterrcnn_ext") for t in op_types(model))
    for image in images:
        got, expected = detections(run(model, image)), detections(run(reference, image))
        assert len(got[0]["boxes"]) > 0
        assert_same_detections(got, expected)


def test_detector_gives_the_pytorch_detections():
    """onnxruntime against our PyTorch model, on sizes the transform resizes by either side (the random-model
    criterion of test_onnx.py: onnxruntime's convolutions and Resize differ from PyTorch's in the last bits)."""
    model = spread_tiny()
    exported = export_detector(model, torch.rand(3, 192, 256), True)
    g = torch.Generator().manual_seed(4)
    for size in [(200, 260), (300, 150), (480, 640)]:
        image = torch.rand(3, *size, generator=g)
        got = detections(run(exported, image))[0]
        assert_twins_across_runtimes(got, eager_detections(model, [image])[0])


def test_openvino_runs_the_dynamo_export_like_onnxruntime():
    openvino = import_openvino()
    model = spread_tiny()
    exported = export_detector(model, torch.rand(3, 192, 256), True)
    compiled = openvino_compile(openvino, exported)
    g = torch.Generator().manual_seed(5)
    for size in [(200, 260), (300, 150)]:
        image = torch.rand(3, *size, generator=g)
        outputs = compiled({"image": image.numpy()})
        got = detections([torch.from_numpy(outputs[name]) for name in ("boxes", "labels", "scores")])
        assert_twins_across_runtimes(got[0], detections(run(exported, image))[0])

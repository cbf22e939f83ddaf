"""A plain ``torch.onnx.export(model, args, path)`` (torch's default exporter, the torch.export-based one, with no
``custom_translation_table``) translates our ops: importing fasterrcnn_ext registers their onnxscript forms in
onnxscript's default torch_lib registry, which the exporter reads. onnxruntime then gives the op results, and for
the detector the detections of ``export_onnx(..., dynamo=True)`` (which passes the table itself)."""

import io
import subprocess
import sys
import warnings

import pytest
import torch

import fasterrcnn_ext.ops as ops
from fasterrcnn_ext.benchmark.inputs import random_boxes

from .test_export import spread_tiny
from .test_faster_rcnn import BUILDERS, assert_same_detections, small_model
from .test_onnx import Fn, assert_twins_across_runtimes, detections, op_types, run
from .test_onnx_dynamo import export_detector

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")


def plain_export(model, args) -> bytes:
    """torch.onnx.export with every argument left at torch's default but the file."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, f, verbose=False)
    return f.getvalue()


def test_each_op_exports_with_the_default_exporter():
    g = torch.Generator().manual_seed(0)
    boxes, scores = random_boxes(200, 100.0, generator=g), torch.rand(200, generator=g)
    idxs = torch.randint(0, 4, (200,), generator=g)
    feats = [torch.rand(1, 4, 32 // 2**k, 40 // 2**k, generator=g) for k in range(2)]
    rois = torch.cat([torch.zeros(30, 1), random_boxes(30, 120.0, generator=g)], 1)
    cells = [torch.tensor([[-8.0, -8.0, 8.0, 8.0], [-16.0, -8.0, 16.0, 8.0]])]
    levels, sizes = [300], [(180, 200)]
    anchors = random_boxes(300, 200.0, generator=g)
    objectness, deltas = torch.randn(1, 300, generator=g) * 3, torch.randn(1, 300, 4, generator=g) * 0.2
    logits, regression = torch.randn(50, 5, generator=g) * 3, torch.randn(50, 20, generator=g) * 0.3
    cases = {
        "nms": (lambda b, s: ops.nms(b, s, 0.5), (boxes, scores)),
        "batched_nms": (lambda b, s, i: ops.batched_nms(b, s, i, 0.5), (boxes, scores, idxs)),
        "roi_align": (lambda x, r: ops.roi_align(x, r, 7, 0.25, 2, True), (feats[0], rois)),
        "multi_scale_roi_align": (lambda a, b, r: torch.ops.fasterrcnn_ext.multi_scale_roi_align(
            [a, b], r, [0.25, 0.125], 7, 7, 2, False), (*feats, rois)),
        "roi_pool": (lambda x, r: ops.roi_pool(x, r, 7, 0.25), (feats[0], rois)),
        "anchor_grid": (lambda: torch.ops.fasterrcnn_ext.anchor_grid(cells, [5, 6], [8, 8]), ()),
        "rpn_proposals": (lambda o, d, a: tuple(sum(ops.rpn_proposals(o, d, a, levels, sizes, 100, 60, 0.7, 0.0,
                                                                      1e-3), [])), (objectness, deltas, anchors)),
        "detection_postprocess": (lambda c, r, p: tuple(sum(ops.detection_postprocess(
            c, r, [p], sizes, score_thresh=0.2, nms_thresh=0.5, detections_per_img=30), [])),
            (logits, regression, random_boxes(50, 150.0, generator=g))),
    }
    for name, (fn, args) in cases.items():
        with torch.no_grad():  # RoIPool's argmax (for backward) has no ONNX form
            model = plain_export(Fn(fn).eval(), args)
            expected = fn(*args)
        assert not any(t.startswith("fasterrcnn") for t in op_types(model)), name
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = run(model, *args)
        assert len(got) == len(expected) and expected[0].numel() > 0, name
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4, msg=name)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "resnet" in n else n
                                  for n in BUILDERS + ["fasterrcnn_vgg16"]])
def test_detector_exports_with_the_default_exporter(name):
    mine = small_model(name, box_score_thresh=0.05, box_detections_per_img=1000).eval()
    image = torch.rand(3, 320, 416, generator=torch.Generator().manual_seed(0))
    model = plain_export(mine, ([image],))
    assert not any(t.startswith("fasterrcnn") for t in op_types(model))
    got, expected = detections(run(model, image)), detections(run(export_detector(mine, image, True), image))
    assert len(got[0]["boxes"]) > 0
    if "resnet" in name:
        # The randomly initialised ResNets propose slivers and near-tied scores, which onnxruntime's graph-dependent
        # fusions (this graph has fixed sizes, export_onnx's symbolic ones) perturb: the cross-runtime criterion.
        assert_twins_across_runtimes(got[0], expected[0])
    else:
        assert_same_detections(got, expected)


def test_import_registers_without_importing_onnxscript(tmp_path):
    """In a fresh process: importing fasterrcnn_ext leaves onnxscript unimported (it takes about a second), and the
    first export, which imports it, finds the translations."""
    script = f"""
import sys, warnings, torch
import fasterrcnn_ext
assert "onnxscript" not in sys.modules
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parents[2])!r})
from tests.models.test_export import spread_tiny
warnings.simplefilter("ignore")
torch.onnx.export(spread_tiny(), ([torch.rand(3, 96, 128)],), {str(tmp_path / "m.onnx")!r}, verbose=False)
print("exported")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "exported" in out.stdout, out.stderr[-3000:]
    types = op_types((tmp_path / "m.onnx").read_bytes())
    assert "NonMaxSuppression" in types and not any(t.startswith("fasterrcnn") for t in types)


def test_spread_model_default_export_has_detections():
    model = spread_tiny()
    image = torch.rand(3, 200, 260, generator=torch.Generator().manual_seed(1))
    got = detections(run(plain_export(model, ([image],)), image))
    assert_same_detections(got, detections(run(export_detector(model, image, True), image)))
    assert len(got[0]["boxes"]) > 0

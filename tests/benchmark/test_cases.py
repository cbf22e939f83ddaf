"""Benchmark cases that the quick CLI test does not run: the onnxruntime peer row."""

import pytest
import torch

from fasterrcnn_ext.benchmark import cases
from fasterrcnn_ext.models import detection


def test_onnxruntime_peer_runs_the_same_model():
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3,
                                                           box_score_thresh=0.0).eval()
    image = torch.rand(3, 240, 320)
    (case,) = cases._onnxruntime_peer(model, image)
    assert "onnxruntime" in case.name and case.target == 1.0
    with torch.no_grad():
        ours = case.ours()
    boxes, labels, scores = case.torchvision()
    # Counts may differ by a near tie (random weights): tests/models/test_onnx.py compares detections.
    assert boxes.shape[1] == 4 and len(boxes) == len(labels) == len(scores) > 0 and len(ours[0]["boxes"]) > 0

"""Benchmark cases that the quick CLI test does not run: the deployment peer rows (torch.export program,
onnxruntime, OpenVINO)."""

import importlib.util

import pytest
import torch

from fasterrcnn_ext.benchmark import cases
from fasterrcnn_ext.models import detection


def test_deployment_peers_run_the_same_model():
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3,
                                                           box_score_thresh=0.0).eval()
    image = torch.rand(3, 240, 320)
    peers = cases._deployment_peers(model, image)
    assert "torch.export" in peers[0].name and all(case.target == 1.0 for case in peers)
    assert any("dynamo ONNX" in case.name for case in peers) == (importlib.util.find_spec("onnxscript") is not None)
    for case in peers:
        with torch.no_grad():
            ours = case.ours()
            outputs = case.torchvision()
        if isinstance(outputs, list) and isinstance(outputs[0], dict):  # the torch.export program's detections
            outputs = outputs[0]
        boxes = outputs[0] if isinstance(outputs, list) else outputs["boxes"]
        # Counts may differ by a near tie (random weights): tests/models/test_onnx.py compares detections.
        assert boxes.shape[1] == 4 and len(boxes) > 0 and len(ours[0]["boxes"]) > 0

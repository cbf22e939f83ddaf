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


def test_training_step_gives_torchvision_losses_and_fills_gradients():
    """The training case's step: the same seeded samples on both sides, so the same losses; and a real backward."""
    from torchvision.models.detection import faster_rcnn as tv

    torch.manual_seed(0)
    theirs = tv.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=5).train()
    ours = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=5).train()
    ours.load_state_dict(theirs.state_dict())
    images = [torch.rand(3, 240, 320), torch.rand(3, 200, 300)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 120.0, 150.0], [150.0, 30.0, 300.0, 200.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[5.0, 5.0, 60.0, 90.0]]), "labels": torch.tensor([4])}]
    ours_step = cases.training_step(ours, images, targets)
    theirs_step = cases.training_step(theirs, images, targets)
    with torch.no_grad():  # as the benchmark runner calls it
        ours_losses, theirs_losses = ours_step(), theirs_step()
    assert ours_losses.shape == (4,) and bool(torch.isfinite(ours_losses).all())
    # Sorted keys: loss_box_reg, loss_classifier, loss_objectness, loss_rpn_box_reg. The box head's losses within
    # the tolerance of tests/models/test_faster_rcnn.py (near-equal proposal scores may be ordered differently).
    torch.testing.assert_close(ours_losses[2:], theirs_losses[2:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_losses[:2], theirs_losses[:2], rtol=1e-2, atol=1e-3)
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[-4:])
    assert any(bool(g.abs().sum() > 0) for g in grads if g is not None)
    # A second call starts from zeroed gradients: the same gradients again, not twice them.
    first = ours.roi_heads.box_predictor.cls_score.weight.grad.clone()
    with torch.no_grad():
        ours_step()
    torch.testing.assert_close(ours.roi_heads.box_predictor.cls_score.weight.grad, first)


def test_training_group_is_registered():
    assert "training" in cases.ALL_CASES

"""FasterRCNN.detect_padded (the eval forward with static sizes) and CUDAGraphDetector, which captures it.

On the CPU: detect_padded gives forward's detections, and it runs whole on meta tensors, which have no values: no
step reads a device tensor on the host (.item(), nonzero, a per-image split) or sizes an output by its values, and
after a first call none copies from the host. That is what a CUDA graph capture needs. On a GPU: the capture and
replays themselves.
"""

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fasterrcnn_ext.models import detection as ours
from fasterrcnn_ext.models.detection import CUDAGraphDetector, padded_detections_to_list

from .test_export import spread_tiny
from .test_faster_rcnn import images_and_targets, small_model

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")


def assert_same_list(got, expected):
    """The same detections, in the same order (the box head runs on more rows in detect_padded: float tolerance)."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-5, atol=1e-4)


def spread_heads(model):
    """Scores far apart (a random predictor's are near-tied), so that the last-bit differences of the box head run
    on more rows cannot reorder detections or flip an NMS decision."""
    g = torch.Generator().manual_seed(2)
    predictor = model.roi_heads.box_predictor
    with torch.no_grad():
        predictor.cls_score.weight.copy_(torch.randn(predictor.cls_score.weight.shape, generator=g))
        predictor.cls_score.bias.copy_(torch.randn(predictor.cls_score.bias.shape, generator=g) * 2)
        predictor.bbox_pred.weight.copy_(torch.randn(predictor.bbox_pred.weight.shape, generator=g) * 0.05)
    return model


def check_detect_padded(model, images):
    with torch.no_grad():
        expected = model(images)
    boxes, scores, labels, counts = model.detect_padded(images)
    d = model.roi_heads.detections_per_img
    assert boxes.shape == (len(images), d, 4) and scores.shape == labels.shape == (len(images), d)
    assert counts.tolist() == [len(e["boxes"]) for e in expected]
    for i, c in enumerate(counts.tolist()):
        assert not boxes[i, c:].any() and not scores[i, c:].any() and not labels[i, c:].any()
    assert_same_list(padded_detections_to_list(boxes, scores, labels, counts), expected)
    return expected


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "resnet" in n else n
                                  for n in ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2",
                                            "fasterrcnn_mobilenet_v3_large_fpn",
                                            "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_vgg16"]])
def test_detect_padded_gives_forward_detections(name):
    model = spread_heads(small_model(name, box_score_thresh=0.01)).eval()
    images, _ = images_and_targets(2, sizes=[(320, 416), (300, 380)])  # two sizes: resized and padded
    expected = check_detect_padded(model, images)
    assert sum(len(e["boxes"]) for e in expected) > 0


@pytest.mark.parametrize("fast_inference", [True, False])
def test_detect_padded_tiny_with_few_proposals(fast_inference):
    """fasterrcnn_tiny on small images keeps fewer proposals than post_nms_top_n: padded proposal rows must not
    become detections."""
    model = spread_tiny()
    model.fast_inference = fast_inference
    model.rpn._post_nms_top_n["testing"] = 5000  # more than NMS leaves: padding rows in every image
    images = [torch.rand(3, 200, 260), torch.rand(3, 180, 240)]
    check_detect_padded(model, images)
    with torch.no_grad():
        image_list, _ = model.transform(images)
        features = model.backbone(image_list.tensors)
        features = {"0": features} if isinstance(features, torch.Tensor) else features
        _, proposal_counts = model.rpn.padded_proposals(model.rpn.head, image_list, features)
    assert (proposal_counts < model.rpn.post_nms_top_n()).any()


def test_detect_padded_refuses_training_mode_and_bad_images():
    model = spread_tiny().train()
    with pytest.raises(ValueError, match="eval mode"):
        model.detect_padded([torch.rand(3, 64, 64)])
    model.eval()
    with pytest.raises(ValueError, match=r"images\[0\] must be a \[C, H, W\] tensor"):
        model.detect_padded([torch.rand(64, 64)])


class _HostTraffic(TorchDispatchMode):
    """Records every op that moves tensor data between the host and the (meta) device."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        tensors_out = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        devices_in = {t.device.type for t in tensors_in if t.numel() > 0}
        devices_out = {t.device.type for t in tensors_out}
        if ("cpu" in devices_in and "meta" in devices_out) or ("meta" in devices_in and "cpu" in devices_out):
            self.copies.append(str(func))
        return out


def _record_tensors_from_python_data(monkeypatch, calls):
    """torch.tensor / as_tensor / scalar_tensor straight onto the meta device skip the dispatcher (no copy op to see);
    on CUDA each is a copy from pageable host memory. Record them."""
    for name in ("tensor", "as_tensor", "scalar_tensor"):
        original = getattr(torch, name)

        def recorder(*args, _original=original, _name=name, **kwargs):
            out = _original(*args, **kwargs)
            if out.device.type == "meta":
                calls.append(f"torch.{_name}")
            return out

        monkeypatch.setattr(torch, name, recorder)


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_vgg16"])
def test_detect_padded_never_reads_or_copies_device_data(name, monkeypatch):
    """On meta tensors every data-dependent step fails (they have no values): detect_padded runs whole, and after a
    first call nothing moves data between host and device. forward cannot (it splits per image on the host)."""
    model = small_model(name).eval().to("meta")
    model.fast_inference = False  # the inference copies are Python bookkeeping over the same modules
    images = [torch.rand(3, 320, 416, device="meta"), torch.rand(3, 300, 380, device="meta")]
    model.detect_padded(images)  # the first call moves the normalisation constants and anchors to the device
    from_python = []
    _record_tensors_from_python_data(monkeypatch, from_python)
    with _HostTraffic() as traffic:
        boxes, scores, labels, counts = model.detect_padded(images)
    assert traffic.copies == [] and from_python == []
    assert boxes.device.type == "meta" and boxes.shape == (2, model.roi_heads.detections_per_img, 4)
    with pytest.raises((NotImplementedError, RuntimeError)), torch.no_grad():
        model(images)


@pytest.mark.cuda
@NEEDS_CUDA
@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_vgg16"])
def test_cuda_graph_replays_forward_detections(name):
    model = spread_heads(small_model(name, box_score_thresh=0.01)).eval().cuda()
    detector = CUDAGraphDetector(model, (320, 416), batch_size=2)
    for seed in (0, 1):
        images, _ = images_and_targets(2, seed=seed)
        images = [image.cuda() for image in images]
        with torch.no_grad():
            expected = model(images)
        assert_same_list(detector(images), expected)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # a replay waits for nothing on the host
        try:
            boxes, _, _, counts = detector(images, padded=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert counts.tolist() == [len(e["boxes"]) for e in expected]
    with pytest.raises(ValueError, match="captured for 2 images"):
        detector(images[:1])


@pytest.mark.cuda
@NEEDS_CUDA
def test_cuda_detect_padded_does_not_synchronise():
    model = small_model("fasterrcnn_mobilenet_v3_large_320_fpn").eval().cuda()
    images = [torch.rand(3, 320, 416, device="cuda")]
    model.detect_padded(images)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.detect_padded(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@NEEDS_CUDA
def test_cuda_eval_forward_is_detect_padded_with_one_host_read():
    model = spread_heads(small_model("fasterrcnn_mobilenet_v3_large_320_fpn", box_score_thresh=0.01)).eval().cuda()
    images = [image.cuda() for image in images_and_targets(2)[0]]
    with torch.no_grad():
        static = model(images)
        model.static_cuda_forward = False
        dynamic = model(images)
        model.static_cuda_forward = True
        assert_same_list(static, dynamic)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(images)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in caught if "synchroniz" in str(w.message).lower()]) == 1  # the counts, to split


def test_cuda_graph_detector_refuses_what_it_cannot_capture():
    model = spread_tiny()
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        CUDAGraphDetector(model, (64, 64))
    with pytest.raises(ValueError, match="eval mode"):
        CUDAGraphDetector(model.train(), (64, 64))
    with pytest.raises(ValueError, match="fasterrcnn_ext FasterRCNN"):
        CUDAGraphDetector(torch.nn.Linear(2, 2), (64, 64))
    assert ours.CUDAGraphDetector is CUDAGraphDetector

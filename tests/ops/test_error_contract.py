"""torchvision's error contract: where torchvision fails an assertion on a bad argument, ours raises an ArgumentError,
which both ``except AssertionError`` (code written against torchvision) and ``except ValueError`` catch, with a
message that says what was wrong. Each case runs torchvision's own object (saved before any patch) and ours, side by
side."""

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

import fasterrcnn_ext
import fasterrcnn_ext.ops as ops
from fasterrcnn_ext import _torchvision as tv
from fasterrcnn_ext.models import detection as det
from fasterrcnn_ext.models.detection import TinyBackbone


def test_argument_error_is_both_an_assertion_error_and_a_value_error():
    assert issubclass(fasterrcnn_ext.ArgumentError, AssertionError)
    assert issubclass(fasterrcnn_ext.ArgumentError, ValueError)
    assert fasterrcnn_ext.ArgumentError is ops._utils.ArgumentError


FEATURES = torch.rand(2, 4, 16, 16)
ROIS_K4 = torch.tensor([[1.0, 1, 8, 8]])
LIST_L5 = [torch.tensor([[0.0, 1, 1, 8, 8]])]


def _anchor_call(cls):
    """Anchors for one level, asked for two feature maps."""
    generator = cls(((32,),), ((0.5, 1.0, 2.0),))
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    return lambda: generator(images, [torch.zeros(1, 8, 8, 8), torch.zeros(1, 8, 4, 4)])


def _detector(cls):
    torch.manual_seed(0)
    return cls(TinyBackbone(), num_classes=3, min_size=64, max_size=64,
               rpn_anchor_generator=tv.AnchorGenerator(((32,),), ((0.5, 1.0, 2.0),)),
               box_roi_pool=tv.MultiScaleRoIAlign(["0"], 7, 2))


def _detector_call(cls, images, targets, training):
    def call():
        model = _detector(cls).train(training)
        return model(images, targets)
    return call


IMAGE = [torch.rand(3, 64, 64)]
DEGENERATE = [{"boxes": torch.tensor([[10.0, 10, 5, 20]]), "labels": torch.tensor([1])}]
BOXES_K5 = [{"boxes": torch.zeros(1, 5), "labels": torch.tensor([1])}]
BOXES_LIST = [{"boxes": [[1.0, 1, 8, 8]], "labels": torch.tensor([1])}]

# (case, torchvision's call, our call, our message)
CASES = [
    ("roi_align: boxes Tensor[K, 4]", lambda: tv.roi_align(FEATURES, ROIS_K4, 2),
     lambda: ops.roi_align(FEATURES, ROIS_K4, 2), r"boxes must be a Tensor\[K, 5\] .* got a tensor of shape \(1, 4\)"),
    ("roi_align: a list of Tensor[L, 5]", lambda: tv.roi_align(FEATURES, LIST_L5, 2),
     lambda: ops.roi_align(FEATURES, LIST_L5, 2), r"boxes\[0\] must be a Tensor\[L, 4\], got shape \(1, 5\)"),
    ("roi_align: boxes neither a tensor nor a list", lambda: tv.roi_align(FEATURES, {"boxes": ROIS_K4}, 2),
     lambda: ops.roi_align(FEATURES, {"boxes": ROIS_K4}, 2), r"boxes must be a Tensor\[K, 5\] .* got dict"),
    ("roi_pool: boxes Tensor[K, 4]", lambda: tv.roi_pool(FEATURES, ROIS_K4, 2),
     lambda: ops.roi_pool(FEATURES, ROIS_K4, 2), r"got a tensor of shape \(1, 4\)"),
    ("roi_pool: a list of Tensor[L, 5]", lambda: tv.roi_pool(FEATURES, LIST_L5, 2),
     lambda: ops.roi_pool(FEATURES, LIST_L5, 2), r"boxes\[0\] must be a Tensor\[L, 4\]"),
    ("roi_pool: boxes neither a tensor nor a list", lambda: tv.roi_pool(FEATURES, 3, 2),
     lambda: ops.roi_pool(FEATURES, 3, 2), r"got int"),
    ("RoIAlign: boxes Tensor[K, 4]", lambda: tv.RoIAlign(2, 1.0, 2)(FEATURES, ROIS_K4),
     lambda: ops.RoIAlign(2, 1.0, 2)(FEATURES, ROIS_K4), r"Tensor\[K, 5\]"),
    ("RoIPool: a list of Tensor[L, 5]", lambda: tv.RoIPool(2, 1.0)(FEATURES, LIST_L5),
     lambda: ops.RoIPool(2, 1.0)(FEATURES, LIST_L5), r"Tensor\[L, 4\]"),
    ("AnchorGenerator: anchors for another number of feature maps", _anchor_call(tv.AnchorGenerator),
     _anchor_call(det.AnchorGenerator), r"got 2 feature maps but anchors for 1 levels"),
    ("BoxCoder.decode: boxes a tensor, not a list", lambda: tv.BoxCoder((1.0, 1.0, 1.0, 1.0)).decode(
        torch.zeros(1, 4), torch.rand(1, 4)), lambda: det.BoxCoder((1.0, 1.0, 1.0, 1.0)).decode(
        torch.zeros(1, 4), torch.rand(1, 4)), r"boxes must be a list of Tensor\[K_i, 4\], got Tensor"),
    ("FasterRCNN: training without targets", _detector_call(tv.FasterRCNN, IMAGE, None, True),
     _detector_call(det.FasterRCNN, IMAGE, None, True), r"targets are required in training mode"),
    ("FasterRCNN: target boxes Tensor[K, 5]", _detector_call(tv.FasterRCNN, IMAGE, BOXES_K5, True),
     _detector_call(det.FasterRCNN, IMAGE, BOXES_K5, True), r"targets\[0\]\['boxes'\] must be a \[K, 4\] tensor"),
    ("FasterRCNN: target boxes not a tensor", _detector_call(tv.FasterRCNN, IMAGE, BOXES_LIST, True),
     _detector_call(det.FasterRCNN, IMAGE, BOXES_LIST, True), r"must be a \[K, 4\] tensor, got list"),
    ("FasterRCNN: a box with x2 <= x1", _detector_call(tv.FasterRCNN, IMAGE, DEGENERATE, True),
     _detector_call(det.FasterRCNN, IMAGE, DEGENERATE, True), r"has x2 <= x1 or y2 <= y1"),
    ("FasterRCNN: a 1-D image", _detector_call(tv.FasterRCNN, [torch.rand(64)], None, False),
     _detector_call(det.FasterRCNN, [torch.rand(64)], None, False), r"images\[0\] must be a \[C, H, W\] tensor"),
]


@pytest.mark.parametrize("case, theirs, mine, message", CASES, ids=[c[0] for c in CASES])
def test_where_torchvision_asserts_ours_raises_an_argument_error(case, theirs, mine, message):
    with pytest.raises(AssertionError):
        theirs()
    with pytest.raises(fasterrcnn_ext.ArgumentError, match=message):
        mine()
    for caught in (AssertionError, ValueError):  # both kinds of caller
        try:
            mine()
        except caught:
            pass


def test_patched_torchvision_names_keep_the_contract():
    """Code that calls torchvision.ops and catches AssertionError still catches ours once patched."""
    import torchvision

    with fasterrcnn_ext.patch_torchvision():
        with pytest.raises(AssertionError, match=r"Tensor\[K, 5\]"):
            torchvision.ops.roi_align(FEATURES, ROIS_K4, 2)
        with pytest.raises(AssertionError, match=r"Tensor\[L, 4\]"):
            torchvision.ops.roi_pool(FEATURES, LIST_L5, 2)

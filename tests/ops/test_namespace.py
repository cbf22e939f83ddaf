"""fasterrcnn_ext.ops as a replacement for torchvision.ops: ours where we have a kernel, torchvision's elsewhere."""

import pytest
import torch
import torchvision

import fasterrcnn_ext.ops as ops
from fasterrcnn_ext import _torchvision


def test_every_torchvision_op_name_is_reachable():
    for name in torchvision.ops.__all__:
        assert getattr(ops, name) is not None, name
        assert name in dir(ops)


def test_our_kernels_win_and_the_rest_is_torchvision():
    # torchvision's own objects, as saved before any patch_torchvision() (which puts ours behind torchvision.ops.nms)
    assert ops.nms is not _torchvision.nms and ops.nms.__module__.startswith("fasterrcnn_ext")
    assert ops.MultiScaleRoIAlign is not _torchvision.MultiScaleRoIAlign
    assert ops.box_area is torchvision.ops.box_area is _torchvision.OPS["box_area"]
    assert ops.FrozenBatchNorm2d is torchvision.ops.FrozenBatchNorm2d
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0]])
    assert ops.box_area(boxes).item() == 6.0
    assert ops.box_convert(boxes, "xyxy", "cxcywh").tolist() == [[1.0, 1.5, 2.0, 3.0]]


def test_unknown_names_still_raise():
    with pytest.raises(AttributeError, match="has no attribute 'no_such_op'"):
        ops.no_such_op  # noqa: B018
    with pytest.raises(ImportError):
        from fasterrcnn_ext.ops import no_such_op  # noqa: F401

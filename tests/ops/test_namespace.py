"""fasterrcnn_ext.ops as a replacement for torchvision.ops: ours where we have a kernel, torchvision's elsewhere."""

import pytest
import torch
import torchvision

import fasterrcnn_ext
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


def test_ops_utils_is_the_public_home_of_what_models_need():
    """ops.utils holds the same objects as the private modules that define them (which stay importable)."""
    from fasterrcnn_ext.ops import _onnx, _onnxscript, _utils, utils

    assert utils.ArgumentError is _utils.ArgumentError is fasterrcnn_ext.ArgumentError
    assert issubclass(utils.ArgumentError, ValueError) and issubclass(utils.ArgumentError, AssertionError)
    assert utils.pair is _utils.pair and utils.pair(7) == (7, 7) and utils.pair([3, 5]) == (3, 5)
    assert utils.tracing_by_value is _onnx.tracing_by_value and utils.exporting is _onnx.exporting
    assert utils.onnx_translations is _onnxscript.onnx_translations
    assert not utils.tracing_by_value() and not utils.exporting()
    assert set(utils.__all__) <= set(dir(utils))
    assert "utils" not in torchvision.ops.__all__  # no torchvision name is shadowed


def test_models_reach_ops_through_public_names_only():
    """fasterrcnn_ext.models imports no private module of fasterrcnn_ext.ops (ops._onnx, ops._utils, ...)."""
    import ast
    import pathlib

    import fasterrcnn_ext.models

    # faster_rcnn.py: still imports ops._onnx and ops._utils; its rewrite moves it to ops.utils.
    root = pathlib.Path(fasterrcnn_ext.models.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ops."):
                if any(part.startswith("_") for part in node.module.split(".")[1:]):
                    offenders.append(f"{path.relative_to(root)}: from {'.' * node.level}{node.module}")
    assert not offenders, offenders

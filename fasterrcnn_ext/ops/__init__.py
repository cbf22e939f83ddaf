"""Drop-in replacements for torchvision.ops, on fasterrcnn_ext's kernels.

The ops a Faster R-CNN spends its time in are ours; every other name of torchvision.ops (box_area, box_convert,
generalized_box_iou, FrozenBatchNorm2d, FeaturePyramidNetwork, ...) is torchvision's own, reached through this module,
so ``import fasterrcnn_ext.ops as ops`` can replace ``import torchvision.ops as ops`` in a detection code base.
They are the objects fasterrcnn_ext found in torchvision.ops on import (fasterrcnn_ext._torchvision), whatever has been
assigned to torchvision's names since.
"""

from torch import fx as _fx

from .. import _torchvision
from .._library import LOADED as _LOADED
from . import _onnx, _onnxscript
from .boxes import (
    BBOX_XFORM_CLIP,
    batched_nms,
    batched_nms_keep_mask,
    box_iou,
    clip_boxes_to_image,
    decode_boxes,
    encode_boxes,
    nms,
    remove_small_boxes,
)
from .conv import conv3x3_winograd, winograd_weight
from .poolers import MultiScaleRoIAlign, multi_scale_roi_align
from .postprocess import detection_postprocess, detection_postprocess_padded, rpn_proposals, rpn_proposals_padded
from .roi_align import RoIAlign, roi_align
from .roi_pool import RoIPool, roi_pool

__all__ = [
    "nms", "batched_nms", "batched_nms_keep_mask", "box_iou", "clip_boxes_to_image", "remove_small_boxes",
    "encode_boxes", "decode_boxes",
    "BBOX_XFORM_CLIP", "rpn_proposals", "detection_postprocess", "rpn_proposals_padded", "detection_postprocess_padded",
    "roi_align", "RoIAlign", "roi_pool", "RoIPool", "MultiScaleRoIAlign", "multi_scale_roi_align",
    "conv3x3_winograd", "winograd_weight",
]


# torch.fx leaves where user code calls them through this module (``ops.roi_align(...)``), as torchvision's are:
# fx.wrap patches a name in the globals of the module that wraps it, so each defining module wraps its own name for
# its own callers (RoIAlign.forward, ...) and this module wraps the names it re-exports.
for _name in ("nms", "batched_nms", "roi_align", "roi_pool", "multi_scale_roi_align"):
    _fx.wrap(_name)
del _name

if _LOADED:
    _onnx.register()  # the ONNX forms of roi_align, roi_pool, nms, batched_nms (torch.onnx.export, dynamo=False)
    _onnxscript.register_when_onnxscript_loads()  # every op's ONNX form for torch.onnx.export's default exporter


def __getattr__(name: str):
    # Only what this module lacks gets here (PEP 562): torchvision's public ops, not accelerated here.
    if name in _torchvision.OPS:
        return _torchvision.OPS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_torchvision.OPS))

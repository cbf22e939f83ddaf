"""torchvision's own objects, as torchvision defines them, saved when fasterrcnn_ext is first imported.

``fasterrcnn_ext.patch_torchvision()`` (and anyone's ``torchvision.ops.box_iou = fasterrcnn_ext.ops.box_iou``) puts
our implementations behind torchvision's names. Whatever of ours falls back on torchvision's arithmetic (integer
boxes, other box formats, ONNX export), subclasses a torchvision class or calls a torchvision builder reaches it
through this module, never through ``torchvision.ops.<name>`` or ``torchvision.models.detection.<name>`` at call
time: a patched name would lead back to us, without end. A module, not a dict: TorchScript resolves a module's
attributes when it compiles our ops' fallbacks.

Each object is read from the module that defines it, and refused if it is one of ours (this module imported again
while patched).
"""

from __future__ import annotations

import importlib
import inspect

import torchvision.ops
from torch import Tensor
from torchvision.models.detection import _utils as _det_utils
from torchvision.models.detection import anchor_utils as _anchor_utils
from torchvision.models.detection import faster_rcnn as _faster_rcnn
from torchvision.models.detection import roi_heads as _roi_heads
from torchvision.models.detection import rpn as _rpn

# The modules that define the ops (torchvision.ops.roi_align, as an attribute of torchvision.ops, is the function).
_boxes = importlib.import_module("torchvision.ops.boxes")
_poolers = importlib.import_module("torchvision.ops.poolers")
_roi_align = importlib.import_module("torchvision.ops.roi_align")
_roi_pool = importlib.import_module("torchvision.ops.roi_pool")


def _own(obj):
    module = getattr(obj, "__module__", "") or ""
    if module.startswith("fasterrcnn_ext"):
        raise ImportError(f"fasterrcnn_ext._torchvision: torchvision's {obj.__qualname__} is fasterrcnn_ext's "
                          "(imported again while torchvision was patched); import it before patching")
    return obj


# torchvision.ops: the names fasterrcnn_ext.ops implements
nms = _own(_boxes.nms)
batched_nms = _own(_boxes.batched_nms)
box_iou = _own(_boxes.box_iou)
clip_boxes_to_image = _own(_boxes.clip_boxes_to_image)
remove_small_boxes = _own(_boxes.remove_small_boxes)
roi_align = _own(_roi_align.roi_align)
roi_pool = _own(_roi_pool.roi_pool)
RoIAlign = _own(_roi_align.RoIAlign)
RoIPool = _own(_roi_pool.RoIPool)
MultiScaleRoIAlign = _own(_poolers.MultiScaleRoIAlign)

# Every public name of torchvision.ops, for fasterrcnn_ext.ops to re-export what it does not implement.
OPS: dict[str, object] = {name: getattr(torchvision.ops, name) for name in torchvision.ops.__all__}
OPS.update(nms=nms, batched_nms=batched_nms, box_iou=box_iou, clip_boxes_to_image=clip_boxes_to_image,
           remove_small_boxes=remove_small_boxes, roi_align=roi_align, roi_pool=roi_pool, RoIAlign=RoIAlign,
           RoIPool=RoIPool, MultiScaleRoIAlign=MultiScaleRoIAlign)

# torchvision.models.detection: the Faster R-CNN builders and the modules they compose
fasterrcnn_resnet50_fpn = _own(_faster_rcnn.fasterrcnn_resnet50_fpn)
fasterrcnn_resnet50_fpn_v2 = _own(_faster_rcnn.fasterrcnn_resnet50_fpn_v2)
fasterrcnn_mobilenet_v3_large_fpn = _own(_faster_rcnn.fasterrcnn_mobilenet_v3_large_fpn)
fasterrcnn_mobilenet_v3_large_320_fpn = _own(_faster_rcnn.fasterrcnn_mobilenet_v3_large_320_fpn)
FasterRCNN = _own(_faster_rcnn.FasterRCNN)
RegionProposalNetwork = _own(_rpn.RegionProposalNetwork)
RoIHeads = _own(_roi_heads.RoIHeads)
AnchorGenerator = _own(_anchor_utils.AnchorGenerator)
BoxCoder = _own(_det_utils.BoxCoder)

# Recent torchvision's box_iou (0.29's) takes a box format and leading batch dimensions; older ones take [N, 4]
# (x1, y1, x2, y2) boxes only.
BOX_IOU_TAKES_FMT = "fmt" in inspect.signature(box_iou).parameters

if BOX_IOU_TAKES_FMT:
    def box_iou_any(boxes1: Tensor, boxes2: Tensor, fmt: str = "xyxy") -> Tensor:
        """torchvision's box_iou, in any box format it takes."""
        return box_iou(boxes1, boxes2, fmt)
else:
    def box_iou_any(boxes1: Tensor, boxes2: Tensor, fmt: str = "xyxy") -> Tensor:
        """torchvision's box_iou (this torchvision's takes (x1, y1, x2, y2) boxes only)."""
        if fmt != "xyxy":
            raise ValueError("box_iou: fmt='" + fmt + "' needs a newer torchvision (this one takes 'xyxy' boxes only)")
        return box_iou(boxes1, boxes2)

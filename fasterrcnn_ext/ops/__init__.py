"""Drop-in replacements for torchvision.ops, on fasterrcnn_ext's kernels."""

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
from .postprocess import detection_postprocess, rpn_proposals
from .roi_align import RoIAlign, roi_align
from .roi_pool import RoIPool, roi_pool

__all__ = [
    "nms", "batched_nms", "batched_nms_keep_mask", "box_iou", "clip_boxes_to_image", "remove_small_boxes", "encode_boxes", "decode_boxes",
    "BBOX_XFORM_CLIP", "rpn_proposals", "detection_postprocess",
    "roi_align", "RoIAlign", "roi_pool", "RoIPool", "MultiScaleRoIAlign", "multi_scale_roi_align",
    "conv3x3_winograd", "winograd_weight",
]

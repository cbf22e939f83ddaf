"""Drop-in replacements for torchvision.ops, on fasterrcnn_ext's kernels."""

from .boxes import batched_nms, nms
from .poolers import MultiScaleRoIAlign, multi_scale_roi_align
from .roi_align import RoIAlign, roi_align
from .roi_pool import RoIPool, roi_pool

__all__ = [
    "nms", "batched_nms",
    "roi_align", "RoIAlign", "roi_pool", "RoIPool", "MultiScaleRoIAlign", "multi_scale_roi_align",
]

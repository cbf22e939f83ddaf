"""Faster R-CNN on fasterrcnn_ext's kernels, mirroring torchvision.models.detection."""

from .anchor_utils import AnchorGenerator

__all__ = ["AnchorGenerator"]

"""Datasets in torchvision's detection format: (image float [3, H, W] in [0, 1], target dict with boxes [K, 4]
x1y1x2y2, labels [K] int64 in 1..num_classes-1, image_id), each with ``class_names``, ``category_ids`` (label - 1
to COCO category id), ``num_classes`` (with the background) and ``coco_ground_truth()`` for evaluation."""

from .coco import CocoDetection, collate, find_annotation_file, load_image
from .synthetic import CLASS_NAMES, SyntheticShapes

__all__ = ["CLASS_NAMES", "CocoDetection", "SyntheticShapes", "collate", "find_annotation_file", "load_image"]

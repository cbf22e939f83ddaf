"""Datasets in torchvision's detection format: (image float [3, H, W] in [0, 1], target dict with boxes [K, 4]
x1y1x2y2, labels [K] int64 in 1..num_classes-1, image_id), each with ``class_names``, ``category_ids`` (label - 1
to COCO category id), ``num_classes`` (with the background) and ``coco_ground_truth()`` for evaluation."""

import os

from .._arguments import argument_error
from .coco import CocoDetection, collate, find_annotation_file, load_image
from .synthetic import CLASS_NAMES, SyntheticShapes

__all__ = ["CLASS_NAMES", "CocoDetection", "SyntheticShapes", "build_dataset", "collate", "find_annotation_file",
           "load_image"]

# Held-out synthetic images come from another seed, so they share no image with the training set.
HELD_OUT_SEED_OFFSET = 1_000_003


def build_dataset(data: str, *, train: bool, split: str, seed: int = 0, synthetic_images: int = 200,
                  skip_bad_images: bool = False, hflip: float = 0.0):
    """The dataset ``data`` names: "synthetic" (SyntheticShapes; held-out images from another seed when
    not ``train``) or a COCO-format folder (CocoDetection of ``split``, flipped at random with ``hflip`` in
    training)."""
    if data == "synthetic":
        # Cached: training revisits every image each epoch; evaluation reads each twice (images, ground truth).
        return SyntheticShapes(synthetic_images, seed=seed if train else seed + HELD_OUT_SEED_OFFSET, cache=True)
    if not os.path.isdir(data):
        raise argument_error(FileNotFoundError, "{data}: not 'synthetic' and not a folder", data=data)
    return CocoDetection(data, split, hflip=hflip if train else 0.0, skip_bad_images=skip_bad_images)

"""SyntheticShapes: a generated detection dataset for demos and tests, deterministic per seed.

Each image is a textured background (smooth colour fields plus grain) with 1 to ``max_objects`` flat-coloured
shapes of four classes (rectangle, ellipse, triangle, cross) at varied sizes, aspect ratios and colours, drawn in
order so later shapes occlude earlier ones. Boxes are the visible extent of each shape; a shape left with less than
``min_visible`` of its area is dropped from the targets (it is mostly hidden, as COCO would not label it either).

Targets are in torchvision's format: boxes [K, 4] float32 (x1, y1, x2, y2 in pixels), labels [K] int64 in 1..4
(0 is the background), image_id, area [K] and iscrowd [K].
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..files import atomic_write

CLASS_NAMES = ("rectangle", "ellipse", "triangle", "cross")


class SyntheticShapes(torch.utils.data.Dataset):
    """Generated shapes, the same image for the same (seed, index) on every machine and run.

    Args:
        num_images (int): length of the dataset.
        image_size (int or (int, int)): (height, width) of every image.
        seed (int): datasets with different seeds share no images (use one for training, another for held-out).
        max_objects (int): at most this many shapes per image (at least one).
        object_size (float, float): shape size range, as fractions of the shorter image side.
        min_visible (float): a shape with less of its area visible than this is not labelled.
        cache (bool): keep rendered images in memory (about 110 KB per 192x192 image) for repeated epochs.
    """

    class_names = CLASS_NAMES
    category_ids = tuple(range(1, len(CLASS_NAMES) + 1))
    num_classes = len(CLASS_NAMES) + 1  # with the background

    def __init__(self, num_images: int, *, image_size=192, seed: int = 0, max_objects: int = 5,
                 object_size=(0.12, 0.45), min_visible: float = 0.4, cache: bool = False):
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(self.image_size) != 2 or min(self.image_size) < 32:
            raise ValueError(f"image_size must be at least 32x32, got {image_size}")
        if max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {max_objects}")
        if not 0 < object_size[0] <= object_size[1] <= 1:
            raise ValueError(f"object_size must be 0 < low <= high <= 1, got {object_size}")
        self.num_images = num_images
        self.seed = seed
        self.max_objects = max_objects
        self.object_size = object_size
        self.min_visible = min_visible
        self._cache: dict | None = {} if cache else None

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int):
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        index %= self.num_images
        image, boxes, labels = self._rendered(index)
        image = torch.from_numpy(image).permute(2, 0, 1).float().div_(255)
        target = {
            "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels, dtype=torch.int64),
            "image_id": index + 1,  # COCO ids start at 1
        }
        b = target["boxes"]
        target["area"] = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        target["iscrowd"] = torch.zeros(len(labels), dtype=torch.int64)
        return image, target

    # -----------------------------------------------------------------------------------------------------------
    def _rendered(self, index: int):
        if self._cache is None:
            return self._render(index)
        if index not in self._cache:
            self._cache[index] = self._render(index)
        return self._cache[index]

    def _render(self, index: int):
        """(image uint8 [H, W, 3], boxes list of [x1, y1, x2, y2], labels list)."""
        rng = np.random.default_rng([self.seed, index])
        h, w = self.image_size
        image = _texture(rng, h, w)
        canvas = Image.fromarray(image)
        draw = ImageDraw.Draw(canvas)
        owner = np.zeros((h, w), dtype=np.int16)  # which shape (1-based) each pixel shows; 0: background
        shapes = []
        for k in range(1, int(rng.integers(1, self.max_objects + 1)) + 1):
            label = int(rng.integers(1, len(CLASS_NAMES) + 1))
            mask_image = Image.new("L", (w, h), 0)
            colour = _shape_colour(rng)
            _draw_shape(rng, label, ImageDraw.Draw(mask_image), draw, colour, h, w, self.object_size)
            mask = np.asarray(mask_image) > 0
            if mask.sum() < 16:
                continue
            owner[mask] = k
            shapes.append((k, label, int(mask.sum())))
        canvas_array = np.asarray(canvas).astype(np.int16)
        grain = rng.integers(-10, 11, size=canvas_array.shape, dtype=np.int16)  # sensor-like noise over everything
        image = np.clip(canvas_array + grain, 0, 255).astype(np.uint8)
        boxes, labels = [], []
        for k, label, full_area in shapes:
            ys, xs = np.nonzero(owner == k)
            if len(xs) < self.min_visible * full_area:
                continue
            boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
            labels.append(label)
        return image, boxes, labels

    # -----------------------------------------------------------------------------------------------------------
    def coco_categories(self) -> list[dict]:
        return [{"id": i, "name": n, "supercategory": "shape"} for i, n in zip(self.category_ids, CLASS_NAMES)]

    def coco_ground_truth(self) -> dict:
        """The dataset's targets as a COCO instances dict (images, annotations, categories), for evaluation."""
        images, annotations = [], []
        for index in range(len(self)):
            _, boxes, labels = self._rendered(index)
            images.append({"id": index + 1, "file_name": f"{index + 1:06d}.png", "height": self.image_size[0],
                           "width": self.image_size[1]})
            for (x1, y1, x2, y2), label in zip(boxes, labels):
                annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": label,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                    "iscrowd": 0})
        return {"images": images, "annotations": annotations, "categories": self.coco_categories()}

    def write_coco(self, root: str, split: str = "train") -> str:
        """Writes the dataset in COCO layout: ``root/<split>/*.png`` and ``root/annotations/instances_<split>.json``.
        Returns the annotation file's path."""
        gt = self.coco_ground_truth()
        os.makedirs(os.path.join(root, split), exist_ok=True)
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        for info in gt["images"]:
            image, _, _ = self._rendered(info["id"] - 1)
            Image.fromarray(image).save(os.path.join(root, split, info["file_name"]))
        path = os.path.join(root, "annotations", f"instances_{split}.json")
        with atomic_write(path) as f:
            json.dump(gt, f)
        return path


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random colour field (bilinear upsampling of a coarse grid) with faint stripes: varied, low-contrast."""
    coarse = rng.uniform(60, 200, size=(int(rng.integers(2, 7)), int(rng.integers(2, 7)), 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.float32)
    period = rng.uniform(6, 24)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = 12 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period))
    return np.clip(field + stripes[..., None], 0, 255).astype(np.uint8)


def _shape_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    # Saturated or very dark/bright colours, so shapes stand out from the mid-tone backgrounds most of the time.
    colour = rng.uniform(0, 255, size=3)
    colour[int(rng.integers(0, 3))] = rng.choice([rng.uniform(0, 40), rng.uniform(215, 255)])
    return tuple(int(c) for c in colour)


def _draw_shape(rng, label, mask_draw, draw, colour, h, w, object_size) -> None:
    side = min(h, w)
    size = rng.uniform(*object_size) * side
    aspect = rng.uniform(0.6, 1.6)
    bw, bh = size * np.sqrt(aspect), size / np.sqrt(aspect)
    bw, bh = min(bw, w - 2), min(bh, h - 2)
    x1 = rng.uniform(0, w - bw)
    y1 = rng.uniform(0, h - bh)
    x2, y2 = x1 + bw, y1 + bh
    name = CLASS_NAMES[label - 1]
    if name == "rectangle":
        points = [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    elif name == "triangle":
        apex = x1 + rng.uniform(0.2, 0.8) * bw
        points = [(apex, y1), (x2, y2), (x1, y2)] if rng.random() < 0.5 else [(apex, y2), (x2, y1), (x1, y1)]
    elif name == "cross":
        tx, ty = bw / 3, bh / 3
        points = [(x1 + tx, y1), (x2 - tx, y1), (x2 - tx, y1 + ty), (x2, y1 + ty), (x2, y2 - ty), (x2 - tx, y2 - ty),
                  (x2 - tx, y2), (x1 + tx, y2), (x1 + tx, y2 - ty), (x1, y2 - ty), (x1, y1 + ty), (x1 + tx, y1 + ty)]
    else:
        points = None
    for d, fill in ((draw, colour), (mask_draw, 255)):
        if points is None:
            d.ellipse([x1, y1, x2, y2], fill=fill)
        else:
            d.polygon(points, fill=fill)

"""A COCO-format detection dataset: ``DIR/annotations/instances_<split>.json`` plus its images.

Images are looked up as ``DIR/<split>/<file_name>``, then ``DIR/images/<file_name>``, then ``DIR/<file_name>``.
Category ids map to contiguous labels 1..K in increasing id order (0 is the background); ``category_ids[label - 1]``
maps back. Crowd annotations and boxes with no area are left out of the training targets (the detector rejects
degenerate boxes; pycocotools still sees the crowd regions through the annotation file).
"""

from __future__ import annotations

import glob
import json
import os
import warnings

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor

from .._arguments import argument_error


def find_annotation_file(root: str, split: str) -> str:
    """``root/annotations/instances_<split>*.json``: exactly one match (``train`` finds instances_train2017.json)."""
    pattern = os.path.join(root, "annotations", f"instances_{split}*.json")
    matches = sorted(glob.glob(pattern))
    exact = os.path.join(root, "annotations", f"instances_{split}.json")
    if exact in matches:
        return exact
    if len(matches) != 1:
        found = ", ".join(os.path.basename(m) for m in matches) or "none"
        raise argument_error(FileNotFoundError, "{root}: expected one annotation file {pattern:value}, found "
                             "{found:value}", root=root, pattern=pattern, found=found)
    return matches[0]


class CocoDetection(torch.utils.data.Dataset):
    """COCO instances as (image float [3, H, W] in [0, 1], target) pairs in torchvision's detection format.

    Args:
        root (str): the dataset folder.
        split (str): the annotation file is ``root/annotations/instances_<split>*.json``.
        hflip (float): probability of a horizontal flip of image and boxes (training augmentation; 0 for eval).
        skip_bad_images (bool): a missing or unreadable image is skipped with a warning (the next image is served in
            its place) instead of raising.
    """

    def __init__(self, root: str, split: str = "train", *, hflip: float = 0.0, skip_bad_images: bool = False):
        self.root = root
        self.annotation_file = find_annotation_file(root, split)
        self.image_dir = self._image_dir(os.path.basename(self.annotation_file)[len("instances_"):-len(".json")])
        self.hflip = hflip
        self.skip_bad_images = skip_bad_images
        self._warned: set[str] = set()
        try:
            with open(self.annotation_file) as f:
                self.coco = json.load(f)
            categories = sorted(self.coco["categories"], key=lambda c: c["id"])
            self.images = sorted(self.coco["images"], key=lambda im: im["id"])
            annotations = self.coco.get("annotations", [])
            self.category_ids = tuple(int(c["id"]) for c in categories)
            self.class_names = tuple(str(c["name"]) for c in categories)
            label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
            self._annotations: dict[int, list] = {int(im["id"]): [] for im in self.images}
            for a in annotations:
                if a.get("iscrowd", 0) or a["image_id"] not in self._annotations:
                    continue
                x, y, w, h = (float(v) for v in a["bbox"])
                if w > 0 and h > 0:
                    self._annotations[a["image_id"]].append(([x, y, x + w, y + h], label_of[a["category_id"]]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"annotation file {self.annotation_file} is not valid COCO instances JSON: "
                             f"{type(e).__name__}: {e}") from e
        if not self.category_ids:
            raise ValueError(f"annotation file {self.annotation_file} has no categories")
        self.num_classes = len(self.category_ids) + 1

    def _image_dir(self, split_name: str) -> str:
        for d in (os.path.join(self.root, split_name), os.path.join(self.root, "images")):
            if os.path.isdir(d):
                return d
        return self.root

    def coco_ground_truth(self) -> dict:
        return self.coco

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        for attempt in range(len(self.images)):
            info = self.images[(index + attempt) % len(self.images)]
            path = os.path.join(self.image_dir, info["file_name"])
            try:
                image = load_image(path)
            except (FileNotFoundError, ValueError) as e:
                if not self.skip_bad_images:
                    raise
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(f"skipping image: {e}", stacklevel=2)
                continue
            return self._sample(image, info)
        raise ValueError(f"no readable image in {self.image_dir} (annotation file {self.annotation_file})")

    def _sample(self, image: torch.Tensor, info: dict):
        anns = self._annotations[int(info["id"])]
        height, width = image.shape[-2:]
        boxes = torch.tensor([b for b, _ in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        labels = torch.tensor([lab for _, lab in anns], dtype=torch.int64)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # boxes wholly outside the image
        boxes, labels = boxes[keep], labels[keep]
        if self.hflip > 0 and torch.rand(()) < self.hflip:
            image = image.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        target = {"boxes": boxes, "labels": labels, "image_id": int(info["id"]),
                  "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
                  "iscrowd": torch.zeros(len(labels), dtype=torch.int64)}
        return image, target


# PIL modes of one channel wider than 8 bits, and the value that maps to 1.0: PIL's convert("RGB") clips these at
# 255 (a 16-bit greyscale PNG would decode as white), so they are scaled by their own range instead.
_WIDE_GREY_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0}


def load_image(path: str) -> torch.Tensor:
    """An image file as float RGB [3, H, W] in [0, 1]; FileNotFoundError or ValueError naming the file.

    8-bit images of any mode (greyscale, palette, RGBA, CMYK) are converted by PIL; 16-bit greyscale (PIL's "I;16"
    modes, and "I" holding 16-bit values, as PIL opens 16-bit PNGs) is scaled from [0, 65535]; 32-bit float ("F")
    is taken as [0, 1] and clamped. Each greyscale image is repeated over the three channels."""
    if os.path.isdir(path):
        raise ValueError(f"image file {path} is a folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in _WIDE_GREY_MODES or im.mode in ("I", "F"):
                return _wide_greyscale(im, path)
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"image file {path} could not be read: {e}") from e
    return pil_to_tensor(im).float().div_(255)


def _wide_greyscale(im, path: str) -> torch.Tensor:
    import numpy as np

    values = torch.from_numpy(np.asarray(im).astype(np.float32))
    if im.mode == "F":
        grey = values.nan_to_num(0.0).clamp_(0, 1)
    else:
        # "I" is PIL's 32-bit integer mode; PNG and TIFF store at most 16 bits per greyscale sample in it.
        if im.mode == "I" and values.numel() and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"image file {path}: 32-bit integer samples outside [0, 65535] "
                             f"({int(values.min())} to {int(values.max())}); no known bit depth to scale them")
        grey = values.div_(_WIDE_GREY_MODES.get(im.mode, 65535.0))
    return grey.reshape(1, *grey.shape[-2:]).expand(3, -1, -1).contiguous()


def collate(batch):
    """A batch as (list of images, list of targets): the detector takes images of different sizes."""
    return tuple(zip(*batch)) if batch else ((), ())

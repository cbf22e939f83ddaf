"""The resize, batching and box rescaling of torchvision's GeneralizedRCNNTransform with symbolic image sizes, for
torch.export with a dynamic image height and width.

Shapes: N images, each [3, H_i, W_i]; resized to h_i x w_i; batched into [N, 3, PH, PW] (PH, PW: the largest h_i,
w_i rounded up to ``size_divisible``).

torchvision computes the resized size in Python floats (``min(800 / short_side, 1333 / long_side)``) and rounds the
batch size with ``math.ceil``: traced symbolically, each comparison and rounding becomes a guard on the example's
size, and the exported program accepts only images that resize like the example. Here the resized size is computed
as torchvision computes it (float64, floor) but in tensors, and read back as unbacked sizes (``Tensor.item`` under
torch.export): the program holds the computation instead of its result. The padding is integer arithmetic. The
numbers are torchvision's bit for bit (tests/models/test_export.py compares the detections).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform


def resizes_symbolically(transform) -> bool:
    """Whether ``transform`` is torchvision's own GeneralizedRCNNTransform resizing by min/max size, whose steps
    these functions reproduce (a custom transform, or a fixed size, is traced as it is)."""
    return type(transform) is GeneralizedRCNNTransform and transform.fixed_size is None


def resized_size(height, width, min_size: float, max_size: float) -> tuple[int, int]:
    """torchvision's eval resize rule, ``floor(side * min(min_size / short_side, max_size / long_side))`` in float64,
    as sizes the exported program computes at run time (unbacked SymInts under torch.export, ints in eager)."""
    sides = torch.stack([torch.scalar_tensor(height, dtype=torch.float64),
                         torch.scalar_tensor(width, dtype=torch.float64)])
    scale = torch.minimum(min_size / sides.min(), max_size / sides.max())
    new_sides = torch.floor(sides * scale).to(torch.int64)
    new_height, new_width = new_sides[0].item(), new_sides[1].item()
    torch._check(new_height >= 1, lambda: f"image of {height}x{width} resizes to an empty image")
    torch._check(new_width >= 1, lambda: f"image of {height}x{width} resizes to an empty image")
    return new_height, new_width


def transform_images(transform: GeneralizedRCNNTransform, images: list[Tensor]) -> ImageList:
    """``transform(images)`` in eval mode (normalise, resize, pad into one batch) with the resized and padded sizes
    kept symbolic."""
    resized: list[Tensor] = []
    for image in images:
        image = transform.normalize(image)
        height, width = resized_size(image.shape[-2], image.shape[-1], float(transform.min_size[-1]),
                                     float(transform.max_size))
        resized.append(F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)[0])
    image_sizes = [(image.shape[-2], image.shape[-1]) for image in resized]
    stride = transform.size_divisible
    padded_height = _round_up(_max([h for h, _ in image_sizes]), stride)
    padded_width = _round_up(_max([w for _, w in image_sizes]), stride)
    batch = torch.stack([F.pad(image, (0, padded_width - image.shape[-1], 0, padded_height - image.shape[-2]))
                         for image in resized])
    return ImageList(batch, image_sizes)


def rescale_boxes(boxes: Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """torchvision's resize_boxes (float32 ratios of the sizes) for symbolic sizes: boxes [K, 4] of an image of
    ``from_size`` mapped onto ``to_size``."""
    ratio_height = (torch.scalar_tensor(to_size[0], dtype=torch.float32, device=boxes.device)
                    / torch.scalar_tensor(from_size[0], dtype=torch.float32, device=boxes.device))
    ratio_width = (torch.scalar_tensor(to_size[1], dtype=torch.float32, device=boxes.device)
                   / torch.scalar_tensor(from_size[1], dtype=torch.float32, device=boxes.device))
    return boxes * torch.stack([ratio_width, ratio_height, ratio_width, ratio_height])


def _round_up(size, multiple: int):
    return (size + multiple - 1) // multiple * multiple


def _max(sizes: list):
    result = sizes[0]
    for size in sizes[1:]:
        result = torch.sym_max(result, size)
    return result

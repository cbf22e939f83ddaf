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


# ---- static sizes (FasterRCNN.detect_padded): no copy from the host once the constants are on the device ----

def normalize_with(transform: GeneralizedRCNNTransform, image: Tensor, constants: dict) -> Tensor:
    """``transform.normalize(image)`` with its mean and std moved to the image's device and dtype once and kept in
    ``constants`` (torchvision copies them from the host at every call, which a CUDA graph cannot capture)."""
    key = (image.device, image.dtype)
    if key not in constants:
        constants[key] = (torch.as_tensor(transform.image_mean, dtype=image.dtype, device=image.device)[:, None, None],
                          torch.as_tensor(transform.image_std, dtype=image.dtype, device=image.device)[:, None, None])
    mean, std = constants[key]
    return (image - mean) / std


def transform_images_static(transform: GeneralizedRCNNTransform, images: list[Tensor], constants: dict) -> ImageList:
    """``transform(images)`` in eval mode with the normalisation constants kept on the device (normalize_with); the
    resize and batching are the transform's own (their sizes are computed on the host from the image sizes)."""
    resized = [transform.resize(normalize_with(transform, image, constants), None)[0] for image in images]
    image_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in resized]
    return ImageList(transform.batch_images(resized, size_divisible=transform.size_divisible), image_sizes)


def rescale_padded_boxes(boxes: Tensor, from_sizes: list[tuple[int, int]], to_sizes: list[tuple[int, int]]) -> Tensor:
    """torchvision's resize_boxes for padded boxes [N, D, 4]: image i's boxes mapped from from_sizes[i] onto
    to_sizes[i] with torchvision's float32 ratios, written on the device by fills (no copy from the host)."""
    ratios = boxes.new_empty((boxes.size(0), 1, 4))
    for i, (size, original) in enumerate(zip(from_sizes, to_sizes)):
        # float32 division on the host, as torchvision divides two float32 tensors: the same ratio bits.
        ratio_height = (torch.tensor(float(original[0])) / torch.tensor(float(size[0]))).item()
        ratio_width = (torch.tensor(float(original[1])) / torch.tensor(float(size[1]))).item()
        ratios[i, 0, 0::2].fill_(ratio_width)
        ratios[i, 0, 1::2].fill_(ratio_height)
    return boxes * ratios


def _round_up(size, multiple: int):
    return (size + multiple - 1) // multiple * multiple


def _max(sizes: list):
    result = sizes[0]
    for size in sizes[1:]:
        result = torch.sym_max(result, size)
    return result

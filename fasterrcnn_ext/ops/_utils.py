"""Argument helpers shared by the op wrappers.

Two kinds: the scriptable helpers (``rois_from_boxes``, ``flat_image_sizes``, ``per_image``), which TorchScript
compiles into a scripted op or detector, and the eager checks (``check_*``, ``pair``), which the wrappers call under
``if not torch.jit.is_scripting():`` to turn bad arguments into ValueErrors that say what was wrong (a scripted op
gets the kernels' own TORCH_CHECK errors instead). Where torchvision asserts on the same argument, the error is an
ArgumentError, which ``except AssertionError`` catches too.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ArgumentError(ValueError, AssertionError):
    """A bad argument, where torchvision's counterpart fails an assertion (``torch._assert``) on it: code written
    against torchvision that catches AssertionError catches it, as does code that catches ValueError."""


def pair(size, name: str = "output_size") -> tuple[int, int]:
    """An int or an (h, w) pair, as torchvision accepts for output_size."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    if isinstance(size, (tuple, list)) and len(size) == 1 and isinstance(size[0], int):
        return int(size[0]), int(size[0])
    raise ValueError(f"{name} must be an int or a pair of ints, got {size!r}")


def check_image_sizes(image_sizes, num_images: int, op: str, name: str = "image_sizes") -> None:
    """ValueError naming ``name`` unless there is exactly one (height, width) pair per image."""
    if not isinstance(image_sizes, (list, tuple)) or len(image_sizes) != num_images:
        got = f"{len(image_sizes)} entries" if isinstance(image_sizes, (list, tuple)) else type(image_sizes).__name__
        raise ValueError(f"{op}: {name} must hold one (height, width) per image, {num_images} images, got {got}")
    for i, hw in enumerate(image_sizes):
        if not isinstance(hw, (list, tuple, torch.Size)) or len(hw) != 2:
            raise ValueError(f"{op}: {name}[{i}] must be a (height, width) pair, got {hw!r}")


def flat_image_sizes(image_sizes: list[tuple[int, int]]) -> list[int]:
    """[h0, w0, h1, w1, ...] from one (height, width) pair per image (ints, or SymInts under torch.export: no int(),
    which would specialise them)."""
    flat: list[int] = []
    for hw in image_sizes:
        flat.append(hw[0])
        flat.append(hw[1])
    return flat


def check_boxes_fit_batch(boxes, batch_size: int, op: str) -> None:
    """A list of per-image boxes may not name more images than the input has (their batch indices would be out of
    range)."""
    if isinstance(boxes, (list, tuple)) and len(boxes) > batch_size:
        raise ValueError(f"{op}: boxes has {len(boxes)} per-image tensors but the input holds {batch_size} images")


def check_boxes(boxes) -> None:
    """ArgumentError (where torchvision asserts) unless ``boxes`` is a Tensor[K, 5] or a list of Tensor[L, 4];
    ValueError for an empty list (torchvision's torch.cat fails on it)."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.size(1) != 5:
            raise ArgumentError("boxes must be a Tensor[K, 5] of (batch index, x1, y1, x2, y2) or a list of "
                                f"Tensor[L, 4], got a tensor of shape {tuple(boxes.shape)}")
        return
    if not isinstance(boxes, (list, tuple)) or not all(isinstance(b, Tensor) for b in boxes):
        raise ArgumentError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    if len(boxes) == 0:
        raise ValueError("boxes is an empty list: give one Tensor[L, 4] per image (L may be 0)")
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.size(1) != 4:
            raise ArgumentError(f"boxes[{i}] must be a Tensor[L, 4], got shape {tuple(b.shape)}")


def roi_dtypes_match(map_dtype: torch.dtype, rois_dtype: torch.dtype) -> bool:
    """Whether the RoI ops take rois of ``rois_dtype`` with a feature map of ``map_dtype``: the same dtype, or float32
    rois with a float16/bfloat16 map (read in its dtype, pooled in float32; box coordinates stay float32)."""
    return rois_dtype == map_dtype or (rois_dtype == torch.float32 and map_dtype in (torch.float16, torch.bfloat16))


def rois_from_boxes(boxes: Tensor | list[Tensor]) -> Tensor:
    """``Tensor[K, 5]`` rois (batch index, x1, y1, x2, y2) from either rois or a list of per-image ``Tensor[L, 4]``.

    The batch-index column is filled on the boxes' device: no host-to-device copy, which from pageable memory would
    wait for the device (a hidden sync in every CUDA call with a list of boxes).
    """
    if not torch.jit.is_scripting():
        check_boxes(boxes)
    if isinstance(boxes, Tensor):
        return boxes
    concat = torch.cat(boxes, dim=0)
    ids = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]  # traces with dynamic sizes
    return torch.cat([torch.cat(ids, dim=0), concat], dim=1)


def per_image(counts: Tensor, values: list[Tensor]) -> list[list[Tensor]]:
    """Each of ``values`` split into one tensor per image, ``counts[i]`` rows for image i.

    One op (split_per_image) reads the sizes on the host, once for all of ``values``; under torch.compile and
    torch.export its fake kernel gives each part an unbacked size, so the graph does not break there.
    """
    parts = torch.ops.fasterrcnn_ext.split_per_image(values, counts)
    n = counts.size(0)
    return [parts[i * n:(i + 1) * n] for i in range(len(values))]

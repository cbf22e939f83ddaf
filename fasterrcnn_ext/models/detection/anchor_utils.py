"""Anchor generation, mirroring torchvision.models.detection.anchor_utils.AnchorGenerator, on one fused op.

Shapes: N images, L feature levels (level l is H_l x W_l), A_l anchors per location, sum_l H_l * W_l * A_l anchors
per image (257,796 for the R50-FPN detector at 768x1344, docs/design.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection import anchor_utils as tv_anchor_utils
from torchvision.models.detection.image_list import ImageList

from ..._library import assert_loaded
from ...ops.utils import ArgumentError, tracing_by_value


class AnchorGenerator(tv_anchor_utils.AnchorGenerator):
    """Anchors for a set of feature maps: for every level, every location and every (size, aspect ratio).

    Same interface and same anchors as torchvision's AnchorGenerator (including the rounding of the base anchors);
    the grids of all levels come from one op call, with no Python loop over levels or images and no host sync.

    A subclass of torchvision's, so torchvision's detection models accept it.

    Args:
        sizes (tuple of tuples of int): anchor sizes (sqrt of area) per level, e.g. ((32,), (64,), ...).
        aspect_ratios (tuple of tuples of float): height / width ratios per level.
    """

    def __init__(self, sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),)):
        nn.Module.__init__(self)
        if not isinstance(sizes[0], (list, tuple)):
            sizes = tuple((s,) for s in sizes)
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (aspect_ratios,) * len(sizes)
        if len(sizes) != len(aspect_ratios):  # torchvision's keeps the shorter's levels, and asserts at the call
            raise ArgumentError(f"AnchorGenerator: sizes ({len(sizes)} levels) and aspect_ratios "
                                f"({len(aspect_ratios)} levels) must have the same length")
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self.cell_anchors = [self.generate_anchors(size, ratio) for size, ratio in zip(sizes, aspect_ratios)]

    @staticmethod
    def generate_anchors(scales, aspect_ratios, dtype: torch.dtype = torch.float32,
                         device: torch.device = torch.device("cpu")) -> Tensor:  # noqa: B008 (torchvision's)
        """Zero-centred anchors [A, 4] of one level, rounded to integers as torchvision does."""
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        base_anchors = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        return base_anchors.round()

    def set_cell_anchors(self, dtype: torch.dtype, device: torch.device) -> None:
        self.cell_anchors = [a.to(dtype=dtype, device=device) for a in self.cell_anchors]

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def all_anchors(self, grid_sizes: list[tuple[int, int]], strides: list[tuple[int, int]]) -> Tensor:
        """The anchors of every level in one Tensor[sum_l H_l * W_l * A_l, 4] (level, row, column, anchor order)."""
        if not torch.jit.is_scripting():
            self._check_levels(len(grid_sizes))
            assert_loaded()
        flat_sizes: list[int] = []
        flat_strides: list[int] = []
        for g, s in zip(grid_sizes, strides):
            flat_sizes += [g[0], g[1]]  # no int(): SymInts under torch.export stay symbolic
            flat_strides += [s[0], s[1]]
        return torch.ops.fasterrcnn_ext.anchor_grid(self.cell_anchors, flat_sizes, flat_strides)

    @torch.jit.unused
    def _check_levels(self, num_maps: int) -> None:
        if num_maps != len(self.cell_anchors):  # an AssertionError in torchvision
            raise ArgumentError(f"AnchorGenerator: got {num_maps} feature maps but anchors for "
                                f"{len(self.cell_anchors)} levels (sizes={self.sizes})")

    def grid_anchors(self, grid_sizes: list[tuple[int, int]], strides: list[tuple[int, int]]) -> list[Tensor]:
        """torchvision's per-level list of anchors."""
        if not torch.jit.is_scripting():
            if tracing_by_value():
                return super().grid_anchors(grid_sizes, strides)
        anchors = self.all_anchors(grid_sizes, strides)
        counts = [g[0] * g[1] * a.size(0) for g, a in zip(grid_sizes, self.cell_anchors)]
        return list(anchors.split(counts))

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """One Tensor[sum_l H_l * W_l * A_l, 4] per image (all images of a batch share one padded size, so the
        same tensor is returned for each: treat it as read-only). Anchors take the features' dtype, except that
        half-precision features get float32 anchors (fp32 box coordinates).

        Under torch.jit.trace or the TorchScript-based ONNX exporter (tracing_by_value()), torchvision's computation
        in standard operations (those record what runs on real tensors; the dynamo exporter translates anchor_grid)."""
        if not torch.jit.is_scripting():
            if tracing_by_value():
                return super().forward(image_list, feature_maps)
        grid_sizes = [(f.shape[-2], f.shape[-1]) for f in feature_maps]
        image_size = image_list.tensors.shape[-2:]
        strides = [(image_size[0] // g[0], image_size[1] // g[1]) for g in grid_sizes]
        dtype = feature_maps[0].dtype
        if dtype in (torch.float16, torch.bfloat16):  # half-precision features (autocast): float32 box coordinates
            dtype = torch.float32
        self.set_cell_anchors(dtype, feature_maps[0].device)
        anchors = self.all_anchors(grid_sizes, strides)
        return [anchors for _ in range(len(image_list.image_sizes))]

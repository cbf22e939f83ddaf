"""Random inputs of the benchmarks and the tests (one home for both): boxes as an RPN emits them, boxes scattered
uniformly, distinct scores. Each draws from ``generator`` (torch's default generator when None), so a seeded
generator gives the same inputs every run; the values are drawn on the CPU and moved to ``device``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _width_height(image_size) -> tuple[float, float]:
    """(width, height) from a side (a square image) or an (height, width) pair."""
    if isinstance(image_size, (tuple, list)):
        return float(image_size[1]), float(image_size[0])
    return float(image_size), float(image_size)


def rpn_like_boxes(n: int, num_clusters: int = 50, image_size=800.0, min_size: float = 16.0, max_size: float = 216.0,
                   dtype: torch.dtype = torch.float32, device="cpu",
                   generator: torch.Generator | None = None) -> Tensor:
    """[n, 4] boxes (x1, y1, x2, y2) clustered as the RPN's proposals are: many heavily overlapping boxes around
    ``num_clusters`` objects of ``min_size`` to ``max_size`` pixels a side, whose centres lie in the image
    (``image_size``: a side, or (height, width)). Boxes may reach past the image, as proposals before clipping do."""
    w, h = _width_height(image_size)
    centres = torch.rand(num_clusters, 2, generator=generator) * torch.tensor([w, h], dtype=torch.float32)
    sizes = torch.rand(num_clusters, 2, generator=generator) * (max_size - min_size) + min_size
    k = torch.randint(0, num_clusters, (n,), generator=generator)
    ctr = centres[k] + torch.randn(n, 2, generator=generator) * sizes[k] * 0.1
    wh = sizes[k] * (1 + 0.2 * torch.randn(n, 2, generator=generator)).abs()
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1)
    return boxes.to(dtype=dtype, device=device)


def random_boxes(n: int, image_size=200.0, max_size: float | None = None, min_size: float = 1.0,
                 dtype: torch.dtype = torch.float32, device="cpu", generator: torch.Generator | None = None) -> Tensor:
    """[n, 4] boxes (x1, y1, x2, y2) with the top-left corner uniform in the image (``image_size``: a side, or
    (height, width)) and sides uniform from ``min_size`` to ``max_size`` pixels (default: a quarter of the image's
    width, plus min_size). Drawn in float64, then rounded to ``dtype``."""
    w, h = _width_height(image_size)
    if max_size is None:
        max_size = w / 4 + min_size
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * torch.tensor([w, h], dtype=torch.float64)
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * (max_size - min_size) + min_size
    return torch.cat([xy, xy + wh], dim=1).to(dtype=dtype, device=device)


def distinct_scores(n: int, dtype: torch.dtype = torch.float32, device="cpu",
                    generator: torch.Generator | None = None) -> Tensor:
    """[n] scores k / n for a random permutation k of 0..n-1: no two tie, so every NMS keeps the same boxes."""
    return (torch.randperm(n, generator=generator).to(torch.float64) / n).to(dtype=dtype, device=device)

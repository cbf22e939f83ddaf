"""Benchmark cases: each times one of our ops against its torchvision counterpart on realistic inputs.

Sizes follow the design notes: an 800x1344 image, 257,796 FPN anchors, 1,000 RoIs on 256-channel FPN maps,
RPN-like clustered boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torchvision

import fasterrcnn_ext.ops as ops


@dataclass
class Case:
    name: str
    ours: Callable[[], object]
    torchvision: Callable[[], object]
    target: float  # the speed-up we aim for (torchvision time / ours) on this device


def rpn_like_boxes(n: int, num_clusters: int = 100, image_size=(800, 1344), device="cpu", seed=0):
    """Clustered boxes as the RPN emits them around objects, with distinct scores."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(num_clusters, 2, generator=g) * torch.tensor(image_size[::-1], dtype=torch.float32)
    sizes = torch.rand(num_clusters, 2, generator=g) * 250 + 16
    k = torch.randint(0, num_clusters, (n,), generator=g)
    ctr = centres[k] + torch.randn(n, 2, generator=g) * sizes[k] * 0.1
    wh = sizes[k] * (1 + 0.2 * torch.randn(n, 2, generator=g)).abs()
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1)
    scores = torch.randperm(n, generator=g).float() / n
    return boxes.to(device), scores.to(device)


def nms_cases(device: str) -> list[Case]:
    cuda = device == "cuda"
    cases = []
    for n in (4_000, 20_000):
        boxes, scores = rpn_like_boxes(n, device=device)
        cases.append(Case(f"nms {n:,} RPN-like boxes",
                          lambda b=boxes, s=scores: ops.nms(b, s, 0.7),
                          lambda b=boxes, s=scores: torchvision.ops.nms(b, s, 0.7),
                          target=2.0 if cuda else 5.0))
    boxes, scores = rpn_like_boxes(20_000, device=device, seed=1)
    classes = torch.randint(0, 80, (20_000,), generator=torch.Generator().manual_seed(2)).to(device)
    cases.append(Case("batched_nms 20,000 boxes, 80 classes",
                      lambda: ops.batched_nms(boxes, scores, classes, 0.5),
                      lambda: torchvision.ops.batched_nms(boxes, scores, classes, 0.5),
                      target=2.0 if cuda else 5.0))
    boxes5, scores5 = rpn_like_boxes(4_000, device=device, seed=3)
    levels = torch.arange(5).repeat_interleave(800).to(device)
    cases.append(Case("batched_nms 4,000 boxes, 5 levels",
                      lambda: ops.batched_nms(boxes5, scores5, levels, 0.7),
                      lambda: torchvision.ops.batched_nms(boxes5, scores5, levels, 0.7),
                      target=2.0 if cuda else 5.0))
    return cases


ALL_CASES: dict[str, Callable[[str], list[Case]]] = {
    "nms": nms_cases,
}

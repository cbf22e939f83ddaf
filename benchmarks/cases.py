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


def realistic_rois(k: int, image_size=(800, 1344), device="cpu", seed=0) -> torch.Tensor:
    """[K, 5] RoIs of one image with log-uniform sizes from 20 to 400 pixels and aspect ratios 1:2 to 2:1."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    size = torch.exp(torch.empty(k).uniform_(3.0, 6.0, generator=g))
    ratio = torch.exp(torch.empty(k).uniform_(-0.7, 0.7, generator=g))
    bw, bh = size * ratio.sqrt(), size / ratio.sqrt()
    cx, cy = torch.rand(k, generator=g) * w, torch.rand(k, generator=g) * h
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
    boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float32))
    return torch.cat([torch.zeros(k, 1), boxes], 1).to(device)


def fpn_features(device="cpu", channels=256, image_size=(800, 1344), seed=0):
    """P2 to P5 of an FPN for one 800x1344 image: 1x256x200x336 down to 1x256x25x42."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    return {str(i): torch.randn(1, channels, h // 2 ** (i + 2), w // 2 ** (i + 2), generator=g).to(device)
            for i in range(4)}


def roi_cases(device: str) -> list[Case]:
    cuda = device == "cuda"
    feats = fpn_features(device)
    p2 = feats["0"]
    rois = realistic_rois(1000, device=device)
    cases = [
        Case("roi_align fwd, 1x256x200x336, 1000 RoIs, 7x7",
             lambda: ops.roi_align(p2, rois, 7, 0.25, 2),
             lambda: torchvision.ops.roi_align(p2, rois, 7, 0.25, 2),
             target=1.5 if cuda else 10.0),
    ]
    if not cuda:
        p2_cl = p2.contiguous(memory_format=torch.channels_last)
        cases.append(Case("roi_align fwd, channels_last input",
                          lambda: ops.roi_align(p2_cl, rois, 7, 0.25, 2),
                          lambda: torchvision.ops.roi_align(p2_cl, rois, 7, 0.25, 2),
                          target=10.0))

    def fwd_bwd(module):
        def run():
            with torch.enable_grad():
                x = p2.detach().requires_grad_()
                out = module.roi_align(x, rois, 7, 0.25, 2)
                out.backward(grad)
        return run

    grad = torch.randn(1000, 256, 7, 7, generator=torch.Generator().manual_seed(1)).to(device)
    cases.append(Case("roi_align fwd+bwd", fwd_bwd(ops), fwd_bwd(torchvision.ops), target=1.0 if cuda else 10.0))
    cases.append(Case("roi_pool fwd, 1x256x200x336, 1000 RoIs, 7x7",
                      lambda: ops.roi_pool(p2, rois, 7, 0.25),
                      lambda: torchvision.ops.roi_pool(p2, rois, 7, 0.25),
                      target=1.0 if cuda else 10.0))
    names = list(feats)
    ours_m = ops.MultiScaleRoIAlign(names, 7, 2)
    theirs_m = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)
    boxes = [rois[:, 1:]]
    shapes = [(800, 1344)]
    cases.append(Case("MultiScaleRoIAlign, P2-P5, 1000 RoIs",
                      lambda: ours_m(feats, boxes, shapes),
                      lambda: theirs_m(feats, boxes, shapes),
                      target=3.0 if cuda else 10.0))
    return cases


ALL_CASES: dict[str, Callable[[str], list[Case]]] = {
    "nms": nms_cases,
    "roi": roi_cases,
}

"""Slow, obviously-correct reference implementations used by the tests (float64, plain torch)."""

from __future__ import annotations

import math

import torch


def score_order(scores: torch.Tensor) -> torch.Tensor:
    """Decreasing score, NaN after every number, ties by lower index (fasterrcnn_ext's documented order)."""
    s = scores.double()
    key = torch.where(s.isnan(), torch.full_like(s, -math.inf), s)
    order = torch.sort(key, descending=True, stable=True).indices
    return order[torch.sort(s[order].isnan().to(torch.uint8), stable=True).indices]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def nms(boxes, scores, iou_threshold, idxs=None, max_keep=-1, acc_dtype=None):
    """Greedy NMS. IoU in `acc_dtype` (default: float32 for half types, else the boxes' dtype)."""
    if acc_dtype is None:
        acc_dtype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    b = boxes.to(acc_dtype)
    order = score_order(scores)
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for k in range(len(order)):
        if len(keep) == max_keep:
            break
        if suppressed[k]:
            continue
        i = order[k]
        keep.append(int(i))
        rest = order[k + 1:]
        # Compared in float64, as torchvision's CPU NMS does (a float32 tensor > a Python float compares in float32).
        over = box_iou(b[i:i + 1], b[rest])[0].double() > iou_threshold
        if idxs is not None:
            over &= idxs[rest] == idxs[i]
        suppressed[k + 1:] |= over
    return torch.tensor(keep, dtype=torch.long)

"""Box ops, mirroring torchvision.ops.boxes: nms, batched_nms.

Shapes: N boxes, as ``Tensor[N, 4]`` in (x1, y1, x2, y2) format with 0 <= x1 < x2 and 0 <= y1 < y2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._library import ops as _ops
from ._registration import register_fake


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, *, max_keep: int = -1) -> Tensor:
    """Non-maximum suppression: keeps the highest-scoring boxes, dropping those that overlap a kept box by more
    than ``iou_threshold`` (IoU).

    Args:
        boxes (Tensor[N, 4]): boxes in (x1, y1, x2, y2) format. float16, bfloat16, float32 or float64; the IoU is
            computed in float32 (float64 for float64 input).
        scores (Tensor[N]): scores of the boxes, same dtype as ``boxes``.
        iou_threshold (float): boxes with IoU > iou_threshold with a kept box are discarded.
        max_keep (int, keyword-only): stop after this many kept boxes; the result is then
            ``nms(boxes, scores, iou_threshold)[:max_keep]``, computed with less work. -1 (default) keeps all.

    Returns:
        Tensor[K] (int64): indices of the kept boxes, sorted by decreasing score. The same indices in the same order
        as torchvision.ops.nms whenever the scores are distinct. Tied scores: the lower index comes first.
        NaN scores rank below every number (so those boxes come last); a box with a NaN coordinate has NaN IoU with
        every box, so it neither suppresses nor is suppressed.
    """
    return _ops().nms(boxes, scores, float(iou_threshold), max_keep=max_keep)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, *, max_keep: int = -1) -> Tensor:
    """Class-aware NMS in one op call: a box only suppresses boxes with the same ``idxs`` value.

    Unlike torchvision, there is no coordinate-offset trick (which loses precision on large coordinates): the
    suppression test itself compares the classes. On the CPU the classes run in parallel.

    Args:
        boxes (Tensor[N, 4]): boxes in (x1, y1, x2, y2) format.
        scores (Tensor[N]): scores, same dtype as ``boxes``.
        idxs (Tensor[N]): integer category of each box.
        iou_threshold (float): boxes with IoU > iou_threshold with a kept box of the same category are discarded.
        max_keep (int, keyword-only): keep at most this many (the highest-scoring); -1 keeps all.

    Returns:
        Tensor[K] (int64): indices of the kept boxes, sorted by decreasing score (ties: lower index first; NaN
        scores last).
    """
    return _ops().batched_nms(boxes, scores, idxs, float(iou_threshold), max_keep=max_keep)


def _nms_fake_result(boxes: Tensor, max_keep: int) -> Tensor:
    ctx = torch.library.get_ctx()
    num_kept = ctx.new_dynamic_size()
    return boxes.new_empty((num_kept,), dtype=torch.long)


@register_fake("fasterrcnn_ext::nms")
def _nms_fake(dets, scores, iou_threshold, *, max_keep=-1):
    torch._check(dets.dim() == 2 and dets.size(1) == 4, lambda: f"nms: boxes must be a [N, 4] tensor, got {dets.shape}")
    torch._check(scores.dim() == 1, lambda: f"nms: scores must be a [N] tensor, got {scores.shape}")
    torch._check(dets.dtype == scores.dtype, lambda: "nms: boxes and scores must have the same dtype")
    return _nms_fake_result(dets, max_keep)


@register_fake("fasterrcnn_ext::batched_nms")
def _batched_nms_fake(boxes, scores, idxs, iou_threshold, *, max_keep=-1):
    torch._check(boxes.dim() == 2 and boxes.size(1) == 4,
                 lambda: f"batched_nms: boxes must be a [N, 4] tensor, got {boxes.shape}")
    torch._check(scores.dim() == 1 and idxs.dim() == 1, lambda: "batched_nms: scores and idxs must be [N] tensors")
    return _nms_fake_result(boxes, max_keep)

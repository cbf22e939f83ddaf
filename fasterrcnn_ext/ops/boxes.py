"""Box ops, mirroring torchvision.ops.boxes (nms, batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes) and
torchvision's BoxCoder (encode_boxes, decode_boxes).

Shapes: N (and M) boxes, as ``Tensor[N, 4]`` in (x1, y1, x2, y2) format with 0 <= x1 < x2 and 0 <= y1 < y2;
C classes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops.boxes import _box_inter_union as _torchvision_box_inter_union

from .. import _torchvision
from .._library import assert_loaded
from ._onnx import exporting
from ._registration import register_fake
from .constants import BBOX_XFORM_CLIP


@torch.fx.wrap
def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, max_keep: int = -1) -> Tensor:
    """Non-maximum suppression: keeps the highest-scoring boxes, dropping those that overlap a kept box by more
    than ``iou_threshold`` (IoU).

    Args:
        boxes (Tensor[N, 4]): boxes in (x1, y1, x2, y2) format. float16, bfloat16, float32 or float64; the IoU is
            computed in float32 (float64 for float64 input).
        scores (Tensor[N]): scores of the boxes, same dtype as ``boxes``.
        iou_threshold (float): boxes with IoU > iou_threshold with a kept box are discarded.
        max_keep (int): stop after this many kept boxes; the result is then
            ``nms(boxes, scores, iou_threshold)[:max_keep]``, computed with less work. -1 (default) keeps all.
            Ours only (torchvision's nms has three arguments); TorchScript and ONNX export keep it.

    Returns:
        Tensor[K] (int64): indices of the kept boxes, sorted by decreasing score. The same indices in the same order
        as torchvision.ops.nms whenever the scores are distinct. Tied scores: the lower index comes first.
        NaN scores rank below every number (so those boxes come last); a box with a NaN coordinate has NaN IoU with
        every box, so it neither suppresses nor is suppressed.
    """
    if not torch.jit.is_scripting():
        assert_loaded()
    return torch.ops.fasterrcnn_ext.nms(boxes, scores, float(iou_threshold), max_keep=int(max_keep))


@torch.fx.wrap
def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, max_keep: int = -1) -> Tensor:
    """Class-aware NMS in one op call: a box only suppresses boxes with the same ``idxs`` value.

    Unlike torchvision, there is no coordinate-offset trick (which loses precision on large coordinates): the
    suppression test itself compares the classes. On the CPU the classes run in parallel.

    Args:
        boxes (Tensor[N, 4]): boxes in (x1, y1, x2, y2) format.
        scores (Tensor[N]): scores, same dtype as ``boxes``.
        idxs (Tensor[N]): integer category of each box.
        iou_threshold (float): boxes with IoU > iou_threshold with a kept box of the same category are discarded.
        max_keep (int): keep at most this many (the highest-scoring); -1 keeps all. Ours only.

    Returns:
        Tensor[K] (int64): indices of the kept boxes, sorted by decreasing score (ties: lower index first; NaN
        scores last). Empty ``boxes`` give an empty result whatever the other arguments are, as in torchvision.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if not torch.jit.is_scripting():
        assert_loaded()
    return torch.ops.fasterrcnn_ext.batched_nms(boxes, scores, idxs, float(iou_threshold), max_keep=int(max_keep))


def batched_nms_keep_mask(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """batched_nms as a mask: Tensor[N] (bool), True for the boxes batched_nms keeps, in input order.

    Its size is known in advance, so on CUDA nothing waits for the device (batched_nms must, to size its output):
    chain it with other tensor ops and select once at the end.
    """
    if not torch.jit.is_scripting():
        if exporting():  # the kept indices of batched_nms (which has an ONNX form) as a mask
            keep = batched_nms(boxes, scores, idxs, iou_threshold)
            mask = torch.zeros_like(scores, dtype=torch.bool)
            return mask.scatter(0, keep, torch.ones_like(keep, dtype=torch.bool))
        assert_loaded()
    return torch.ops.fasterrcnn_ext.batched_nms_keep_mask(boxes, scores, idxs, float(iou_threshold))


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


@register_fake("fasterrcnn_ext::batched_nms_keep_mask")
def _batched_nms_keep_mask_fake(boxes, scores, idxs, iou_threshold):
    torch._check(boxes.dim() == 2 and boxes.size(1) == 4,
                 lambda: f"batched_nms_keep_mask: boxes must be a [N, 4] tensor, got {boxes.shape}")
    torch._check(scores.dim() == 1 and idxs.dim() == 1,
                 lambda: "batched_nms_keep_mask: scores and idxs must be [N] tensors")
    return boxes.new_empty((boxes.size(0),), dtype=torch.bool)


@register_fake("fasterrcnn_ext::_batched_nms_keep_mask_valid")
def _batched_nms_keep_mask_valid_fake(boxes, scores, idxs, valid, iou_threshold):
    torch._check(valid.dim() == 1 and valid.size(0) == boxes.size(0),
                 lambda: "_batched_nms_keep_mask_valid: valid must be a bool [N] tensor")
    return _batched_nms_keep_mask_fake(boxes, scores, idxs, iou_threshold)


@register_fake("fasterrcnn_ext::_nms_bitmask")
def _nms_bitmask_fake(boxes, scores, idxs, iou_threshold, max_keep, chunk_rows, valid=None):
    torch._check(boxes.dim() == 2 and boxes.size(1) == 4,
                 lambda: f"_nms_bitmask: boxes must be a [N, 4] tensor, got {boxes.shape}")
    return _nms_fake_result(boxes, max_keep)



@torch.jit.unused
def _torchvision_box_iou(boxes1: Tensor, boxes2: Tensor, fmt: str) -> Tensor:
    return _torchvision.box_iou_any(boxes1, boxes2, fmt)


def box_iou(boxes1: Tensor, boxes2: Tensor, fmt: str = "xyxy") -> Tensor:
    """Intersection over union of every pair of boxes.

    Args:
        boxes1 (Tensor[N, 4]), boxes2 (Tensor[M, 4]): boxes in (x1, y1, x2, y2) format.
        fmt (str): "xyxy" (default). The other formats of torchvision's box_iou ("xywh", "cxcywh" and the rotated
            ones, where the installed torchvision takes them) and boxes with leading batch dimensions are computed by
            torchvision.

    Returns:
        Tensor[N, M]: the IoU, in the boxes' dtype (float32 for float16/bfloat16 input, as torchvision). Boxes of two
        floating dtypes are promoted to a common one first, as torchvision's arithmetic does (float64 ground truth
        against float32 anchors: float64). Integer boxes are torchvision's arithmetic (integer areas, a float32
        ratio), computed by torchvision.
    """
    if (fmt != "xyxy" or boxes1.dim() != 2 or boxes2.dim() != 2
            or not (boxes1.is_floating_point() and boxes2.is_floating_point())):
        if torch.jit.is_scripting():
            # torchvision's box_iou as a whole would bring torchvision's op library (its rotated-box op) into the
            # scripted graph, which LibTorch programs without Python cannot load: its xyxy arithmetic alone.
            if fmt != "xyxy":
                raise ValueError("box_iou: scripted, it takes fmt='xyxy' boxes only")
            inter, union = _torchvision_box_inter_union(boxes1, boxes2)
            return inter / union
        return _torchvision_box_iou(boxes1, boxes2, fmt)
    if boxes1.dtype != boxes2.dtype:
        common = torch.promote_types(boxes1.dtype, boxes2.dtype)
        boxes1, boxes2 = boxes1.to(common), boxes2.to(common)
    if not torch.jit.is_scripting():
        if exporting():  # ONNX export and tracing: torchvision's, in standard operations
            return _torchvision.box_iou(boxes1, boxes2)
        assert_loaded()
    return torch.ops.fasterrcnn_ext.box_iou(boxes1, boxes2)


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clips boxes (Tensor[..., 4]) to an image of ``size`` (height, width): x to [0, width], y to [0, height].
    NaN coordinates stay NaN, as with torch.clamp. Integer boxes stay integers (computed by torchvision)."""
    if not boxes.is_floating_point():
        return _torchvision.clip_boxes_to_image(boxes, size)
    if not torch.jit.is_scripting():
        if exporting():
            return _torchvision.clip_boxes_to_image(boxes, size)
        assert_loaded()
    return torch.ops.fasterrcnn_ext.clip_boxes_to_image(boxes, int(size[0]), int(size[1]))


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (Tensor[K], int64) of the boxes (Tensor[N, 4]) whose width and height are both >= min_size.
    Boxes with NaN sides are removed. Integer boxes are compared by torchvision."""
    if not boxes.is_floating_point():
        return _torchvision.remove_small_boxes(boxes, min_size)
    if not torch.jit.is_scripting():
        if exporting():
            return _torchvision.remove_small_boxes(boxes, min_size)
        assert_loaded()
    return torch.ops.fasterrcnn_ext.remove_small_boxes(boxes, float(min_size))


def _four_floats(weights: tuple[float, float, float, float]) -> list[float]:
    if not torch.jit.is_scripting():
        assert_loaded()
        return [float(w) for w in weights]  # any length: the kernel's check names a wrong one
    return [float(weights[0]), float(weights[1]), float(weights[2]), float(weights[3])]


def encode_boxes(reference_boxes: Tensor, proposals: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Regression targets (Tensor[N, 4]: dx, dy, dw, dh) that take ``proposals`` to ``reference_boxes`` (both
    Tensor[N, 4]); torchvision's BoxCoder.encode_single with ``weights`` (wx, wy, ww, wh)."""
    if not torch.jit.is_scripting():
        if exporting():
            return _torchvision.BoxCoder(weights).encode_single(reference_boxes, proposals)
    return torch.ops.fasterrcnn_ext.encode_boxes(reference_boxes, proposals, _four_floats(weights))


def decode_boxes(rel_codes: Tensor, boxes: Tensor, weights: tuple[float, float, float, float],
                 bbox_xform_clip: float = BBOX_XFORM_CLIP) -> Tensor:
    """Applies regression deltas to boxes; torchvision's BoxCoder.decode_single.

    Args:
        rel_codes (Tensor[N, 4 * C]): (dx, dy, dw, dh) per box and class.
        boxes (Tensor[N, 4]): reference boxes (anchors or proposals), same dtype.
        weights ((wx, wy, ww, wh)): the deltas are divided by these.
        bbox_xform_clip (float): upper bound of dw and dh before exp().

    Returns:
        Tensor[N, 4 * C]: decoded boxes, in (x1, y1, x2, y2) format.
    """
    if not torch.jit.is_scripting():
        if exporting():
            return _torchvision.BoxCoder(weights, bbox_xform_clip).decode_single(rel_codes, boxes)
    return torch.ops.fasterrcnn_ext.decode_boxes(rel_codes, boxes, _four_floats(weights), float(bbox_xform_clip))


@register_fake("fasterrcnn_ext::box_iou")
def _box_iou_fake(boxes1, boxes2):
    torch._check(boxes1.dim() == 2 and boxes1.size(1) == 4 and boxes2.dim() == 2 and boxes2.size(1) == 4,
                 lambda: "box_iou: boxes must be [N, 4] tensors")
    dtype = torch.float32 if boxes1.dtype in (torch.float16, torch.bfloat16) else boxes1.dtype
    return boxes1.new_empty((boxes1.size(0), boxes2.size(0)), dtype=dtype)


@register_fake("fasterrcnn_ext::clip_boxes_to_image")
def _clip_fake(boxes, height, width):
    return torch.empty_like(boxes, memory_format=torch.contiguous_format)


@register_fake("fasterrcnn_ext::remove_small_boxes")
def _remove_small_fake(boxes, min_size):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.long)


@register_fake("fasterrcnn_ext::encode_boxes")
def _encode_fake(reference_boxes, proposals, weights):
    torch._check(len(weights) == 4, lambda: "encode_boxes: weights must have 4 values")
    return torch.empty_like(reference_boxes, memory_format=torch.contiguous_format)


@register_fake("fasterrcnn_ext::decode_boxes")
def _decode_fake(rel_codes, boxes, weights, bbox_xform_clip):
    torch._check(len(weights) == 4, lambda: "decode_boxes: weights must have 4 values")
    return torch.empty_like(rel_codes, memory_format=torch.contiguous_format)


@register_fake("fasterrcnn_ext::anchor_grid")
def _anchor_grid_fake(cell_anchors, grid_sizes, strides):
    total = sum(grid_sizes[2 * i] * grid_sizes[2 * i + 1] * a.size(0) for i, a in enumerate(cell_anchors))
    return cell_anchors[0].new_empty((total, 4))

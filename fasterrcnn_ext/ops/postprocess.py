"""Fused post-processing: the RPN's proposal selection and the detector's final detections, one op call per batch.

Shapes: N images, A anchors (all levels), K proposals (all images), C classes (background included), D detections.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._library import assert_loaded
from ._registration import register_fake
from ._utils import check_image_sizes, flat_image_sizes, per_image
from .constants import BBOX_XFORM_CLIP

# torchvision's box coder weights (wx, wy, ww, wh): the RPN's and the RoI heads' defaults.
RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_HEADS_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def rpn_proposals(objectness: Tensor, deltas: Tensor, anchors: Tensor, num_anchors_per_level: list[int],
                  image_sizes: list[tuple[int, int]], pre_nms_top_n: int, post_nms_top_n: int, nms_thresh: float,
                  score_thresh: float = 0.0, min_size: float = 1e-3,
                  weights: list[float] = RPN_WEIGHTS,  # noqa: B006 (a tuple: immutable)
                  bbox_xform_clip: float = BBOX_XFORM_CLIP) -> tuple[list[Tensor], list[Tensor]]:
    """torchvision's RegionProposalNetwork selection (decode, then filter_proposals) in one op.

    Args:
        objectness (Tensor[N, A]): objectness logits, levels concatenated as torchvision's RPN orders them.
        deltas (Tensor[N, A, 4]): box regression of every anchor.
        anchors (Tensor[A, 4]): the anchors (the same for every image of the batch).
        num_anchors_per_level (list of int): anchors of each level, summing to A.
        image_sizes (list of (int, int)): (height, width) of each image, to clip to.
        pre_nms_top_n, post_nms_top_n (int): best logits kept per image and level before NMS; proposals kept per
            image after it.
        nms_thresh (float): IoU threshold of the per-level NMS.
        score_thresh (float): minimum sigmoid score (>=). min_size (float): minimum box side (>=).
        weights ((wx, wy, ww, wh)), bbox_xform_clip (float): the box coder's weights and its bound on dw and dh
            before exp() (RegionProposalNetwork.box_coder's; torchvision's by default).

    Returns:
        (boxes, scores): one Tensor[P_i, 4] and one Tensor[P_i] per image, by decreasing score. Candidates with NaN
        logits or deltas are dropped (a NaN logit also never takes a top-k slot from a number).
    """
    if not torch.jit.is_scripting():
        assert_loaded()
        check_image_sizes(image_sizes, objectness.size(0) if objectness.dim() == 2 else len(image_sizes),
                          "rpn_proposals")
        weights = [float(w) for w in weights]  # any length: the kernel's check names a wrong one
    boxes, scores, counts = torch.ops.fasterrcnn_ext.rpn_proposals(
        objectness, deltas, anchors, num_anchors_per_level, flat_image_sizes(image_sizes), int(pre_nms_top_n),
        int(post_nms_top_n), float(nms_thresh), float(score_thresh), float(min_size), weights,
        float(bbox_xform_clip))
    split = per_image(counts, [boxes, scores])
    return split[0], split[1]


def detection_postprocess(class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                          image_sizes: list[tuple[int, int]],
                          weights: list[float] = ROI_HEADS_WEIGHTS,  # noqa: B006 (a tuple: immutable)
                          score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                          min_size: float = 1e-2, bbox_xform_clip: float = BBOX_XFORM_CLIP
                          ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """torchvision's RoIHeads.postprocess_detections in one op.

    Args:
        class_logits (Tensor[K, C]), box_regression (Tensor[K, 4 * C]): the box head's outputs for all images.
        proposals (list of Tensor[K_i, 4]): each image's proposals (sum K_i = K).
        image_sizes (list of (int, int)): (height, width) of each image.
        weights ((wx, wy, ww, wh)): box coder weights. score_thresh: scores (softmax) must be > it.
        nms_thresh: per-class NMS IoU threshold. detections_per_img: detections kept per image.
        min_size: minimum box side (>=). bbox_xform_clip: the box coder's bound on dw and dh before exp().

    Returns:
        (boxes, scores, labels): per image, Tensor[D_i, 4], Tensor[D_i], Tensor[D_i] (int64), by decreasing score.
        Rows with NaN logits or deltas are dropped.
    """
    if not torch.jit.is_scripting():
        assert_loaded()
        check_image_sizes(image_sizes, len(proposals), "detection_postprocess")
        weights = [float(w) for w in weights]  # any length: the kernel's check names a wrong one
    boxes_per_image = [p.size(0) for p in proposals]  # SymInts under torch.export: no int(), which would specialise
    boxes, scores, labels, counts = torch.ops.fasterrcnn_ext.detection_postprocess(
        class_logits, box_regression, torch.cat(proposals), boxes_per_image, flat_image_sizes(image_sizes),
        weights, float(score_thresh), float(nms_thresh), int(detections_per_img), float(min_size),
        float(bbox_xform_clip))
    split = per_image(counts, [boxes, scores, labels])
    return split[0], split[1], split[2]


def rpn_proposals_padded(objectness: Tensor, deltas: Tensor, anchors: Tensor, num_anchors_per_level: list[int],
                         image_sizes: list[tuple[int, int]], pre_nms_top_n: int, post_nms_top_n: int,
                         nms_thresh: float, score_thresh: float = 0.0, min_size: float = 1e-3,
                         weights: list[float] = RPN_WEIGHTS,  # noqa: B006 (a tuple: immutable)
                         bbox_xform_clip: float = BBOX_XFORM_CLIP) -> tuple[Tensor, Tensor, Tensor]:
    """rpn_proposals with every output size fixed in advance: no host sync and no copy from the host, so a CUDA
    graph can capture it (the arguments are rpn_proposals').

    Returns:
        (boxes, scores, counts): Tensor[N, post_nms_top_n, 4], Tensor[N, post_nms_top_n] and Tensor[N] (int64). Image
        i's proposals are rows ``[:counts[i]]`` of boxes[i] and scores[i], as rpn_proposals gives them; the other rows
        are zeros.
    """
    if not torch.jit.is_scripting():
        assert_loaded()
        check_image_sizes(image_sizes, objectness.size(0) if objectness.dim() == 2 else len(image_sizes),
                          "rpn_proposals_padded")
        weights = [float(w) for w in weights]
    return torch.ops.fasterrcnn_ext.rpn_proposals_padded(
        objectness, deltas, anchors, num_anchors_per_level, flat_image_sizes(image_sizes), int(pre_nms_top_n),
        int(post_nms_top_n), float(nms_thresh), float(score_thresh), float(min_size), weights,
        float(bbox_xform_clip))


def detection_postprocess_padded(class_logits: Tensor, box_regression: Tensor, proposals: Tensor,
                                 proposal_counts: Tensor, image_sizes: list[tuple[int, int]],
                                 weights: list[float] = ROI_HEADS_WEIGHTS,  # noqa: B006 (a tuple: immutable)
                                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                                 min_size: float = 1e-2, bbox_xform_clip: float = BBOX_XFORM_CLIP
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """detection_postprocess with every output size fixed in advance: no host sync and no copy from the host, so a
    CUDA graph can capture it.

    Args:
        class_logits (Tensor[N * P, C]), box_regression (Tensor[N * P, 4 * C]): the box head's outputs.
        proposals (Tensor[N * P, 4] or Tensor[N, P, 4]): P proposal rows per image, of which the first
            ``proposal_counts[i]`` are image i's (rpn_proposals_padded's output); the other rows are ignored.
        proposal_counts (Tensor[N], int64): real proposals per image.
        The rest as detection_postprocess.

    Returns:
        (boxes, scores, labels, counts): Tensor[N, D, 4], Tensor[N, D], Tensor[N, D] (int64), Tensor[N] (int64),
        D = detections_per_img. Image i's detections are the first ``counts[i]`` rows, as detection_postprocess gives
        them; the other rows are zeros.
    """
    if not torch.jit.is_scripting():
        assert_loaded()
        check_image_sizes(image_sizes, proposal_counts.size(0) if proposal_counts.dim() == 1 else len(image_sizes),
                          "detection_postprocess_padded")
        weights = [float(w) for w in weights]
    return torch.ops.fasterrcnn_ext.detection_postprocess_padded(
        class_logits, box_regression, proposals.reshape(-1, 4), proposal_counts, flat_image_sizes(image_sizes),
        weights, float(score_thresh), float(nms_thresh), int(detections_per_img), float(min_size),
        float(bbox_xform_clip))


# The fake kernels, each registered for its op and the op's test twins (_registration.TEST_TWINS). Each reads the
# arguments that size its outputs; the rest (the schema in csrc/ops/postprocess.cpp is their one home) pass as *_.


@register_fake("fasterrcnn_ext::rpn_proposals")
def _rpn_fake(objectness, *_):
    n = torch.library.get_ctx().new_dynamic_size()
    return (objectness.new_empty((n, 4)), objectness.new_empty((n,)),
            objectness.new_empty((objectness.size(0),), dtype=torch.long))


@register_fake("fasterrcnn_ext::detection_postprocess")
def _detection_fake(class_logits, box_regression, proposals, boxes_per_image, *_):
    n = torch.library.get_ctx().new_dynamic_size()
    return (class_logits.new_empty((n, 4)), class_logits.new_empty((n,)),
            class_logits.new_empty((n,), dtype=torch.long),
            class_logits.new_empty((len(boxes_per_image),), dtype=torch.long))


@register_fake("fasterrcnn_ext::rpn_proposals_padded")
def _rpn_padded_fake(objectness, deltas, anchors, num_anchors_per_level, image_sizes, pre_nms_top_n, post_nms_top_n,
                     *_):
    n = objectness.size(0)
    return (objectness.new_empty((n, post_nms_top_n, 4)), objectness.new_empty((n, post_nms_top_n)),
            objectness.new_empty((n,), dtype=torch.long))


@register_fake("fasterrcnn_ext::detection_postprocess_padded")
def _detection_padded_fake(class_logits, box_regression, proposals, proposal_counts, image_sizes, weights,
                           score_thresh, nms_thresh, detections_per_img, *_):
    n = len(image_sizes) // 2
    return (class_logits.new_empty((n, detections_per_img, 4)), class_logits.new_empty((n, detections_per_img)),
            class_logits.new_empty((n, detections_per_img), dtype=torch.long),
            class_logits.new_empty((n,), dtype=torch.long))


@register_fake("fasterrcnn_ext::split_per_image")
def _split_per_image_fake(values, counts):
    torch._check(counts.dim() == 1, lambda: f"split_per_image: counts must be 1-D, got {counts.shape}")
    ctx = torch.library.get_ctx()
    rows = [ctx.new_dynamic_size() for _ in range(counts.size(0))]  # the same sizes for every tensor of values
    return [v.new_empty((r, *v.shape[1:])) for v in values for r in rows]

"""The box head stage: torchvision's RoIHeads (same submodules, state_dict keys, sampling and losses) with
fasterrcnn_ext's RoI pooling, box coder, IoU and the fused detection post-processing.

Shapes: N images, P_i proposals of image i, C classes (background included), D_i detections of image i.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection import roi_heads as tv_roi_heads

from ... import ops
from ...ops.utils import tracing_by_value
from ._utils import BoxCoder, rebind

__all__ = ["RoIHeads"]


class RoIHeads(tv_roi_heads.RoIHeads):
    """torchvision's RoIHeads (box branch) on fasterrcnn_ext's kernels; the same arguments:

    Args:
        box_roi_pool (nn.Module): pools each proposal's features (MultiScaleRoIAlign, RoIPool, ...).
        box_head (nn.Module): TwoMLPHead or another feature head. box_predictor: FastRCNNPredictor.
        fg_iou_thresh, bg_iou_thresh (float): IoU of a proposal with a ground-truth box to be a positive/negative.
        batch_size_per_image (int), positive_fraction (float): proposals sampled per image for the losses.
        bbox_reg_weights ((wx, wy, ww, wh) or None): box coder weights, (10, 10, 5, 5) by default.
        score_thresh (float), nms_thresh (float), detections_per_img (int): post-processing in eval.
    """

    def __init__(self, box_roi_pool: nn.Module, box_head: nn.Module, box_predictor: nn.Module, fg_iou_thresh: float,
                 bg_iou_thresh: float, batch_size_per_image: int, positive_fraction: float,
                 bbox_reg_weights: tuple[float, float, float, float] | None, score_thresh: float, nms_thresh: float,
                 detections_per_img: int, **kwargs):
        super().__init__(box_roi_pool, box_head, box_predictor, fg_iou_thresh, bg_iou_thresh, batch_size_per_image,
                         positive_fraction, bbox_reg_weights, score_thresh, nms_thresh, detections_per_img, **kwargs)
        self._use_our_kernels()

    @classmethod
    def adopt(cls, heads: tv_roi_heads.RoIHeads) -> RoIHeads:
        """This class over a torchvision RoIHeads' submodules and settings (shared, not copied); ``heads`` itself is
        left as it was."""
        ours = rebind(cls, heads)
        ours._use_our_kernels()
        return ours

    def _use_our_kernels(self) -> None:
        self.box_coder = BoxCoder(self.box_coder.weights)
        self.box_similarity = ops.box_iou

    def assign_targets_to_proposals(self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]
                                    ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's; scripted, with our box_iou: torchvision's would bring torchvision's op library into the
        scripted graph, which LibTorch programs without Python cannot load."""
        if not torch.jit.is_scripting():
            return self._torchvision_assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        matched_idxs: list[Tensor] = []
        labels: list[Tensor] = []
        for proposals_in_image, gt_boxes_in_image, gt_labels_in_image in zip(proposals, gt_boxes, gt_labels):
            if gt_boxes_in_image.numel() == 0:  # a background image
                clamped = torch.zeros((proposals_in_image.shape[0],), dtype=torch.int64,
                                      device=proposals_in_image.device)
                labels_in_image = torch.zeros_like(clamped)
            else:
                matched = self.proposal_matcher(ops.box_iou(gt_boxes_in_image, proposals_in_image))
                clamped = matched.clamp(min=0)
                labels_in_image = gt_labels_in_image[clamped].to(dtype=torch.int64)
                labels_in_image[matched == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0
                labels_in_image[matched == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1  # ignored by the sampler
            matched_idxs.append(clamped)
            labels.append(labels_in_image)
        return matched_idxs, labels

    @torch.jit.unused
    def _torchvision_assign_targets_to_proposals(self, proposals: list[Tensor], gt_boxes: list[Tensor],
                                                 gt_labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        return super().assign_targets_to_proposals(proposals, gt_boxes, gt_labels)

    def postprocess_detections(self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                               image_shapes: list[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Detections per image in one fused op (softmax, decode, clip, thresholds, per-class NMS, top-k); under
        torch.jit.trace or the TorchScript-based ONNX exporter (tracing_by_value()), torchvision's steps, whose every
        operation has an ONNX form. Boxes decode with self.box_coder's weights and exp clamp."""
        if not torch.jit.is_scripting():
            if tracing_by_value():
                return super().postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        dtype = proposals[0].dtype  # boxes stay in float32 when the heads ran in half precision (autocast)
        boxes, scores, labels = ops.detection_postprocess(
            class_logits.to(dtype), box_regression.to(dtype), proposals, image_shapes, self.box_coder.weights,
            self.score_thresh, self.nms_thresh, self.detections_per_img,
            bbox_xform_clip=self.box_coder.bbox_xform_clip)
        return list(boxes), list(scores), list(labels)

    @torch.jit.unused
    def padded_detections(self, features: dict[str, Tensor], proposals: Tensor, proposal_counts: Tensor,
                          image_shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The eval detections with static sizes (FasterRCNN.detect_padded), from padded proposals Tensor[N, P, 4]
        of which image i's first proposal_counts[i] are real: boxes [N, D, 4], scores [N, D], labels [N, D] and
        counts [N], D = detections_per_img, in the resized images' coordinates. The box head runs on all N * P rows
        (rows do not interact in eval); the padding rows are ignored by the post-processing."""
        box_features = self.box_roi_pool(features, list(proposals.unbind(0)), image_shapes)
        class_logits, box_regression = self.box_predictor(self.box_head(box_features))
        dtype = proposals.dtype  # boxes stay in float32 when the heads ran in half precision (autocast)
        return ops.detection_postprocess_padded(
            class_logits.to(dtype), box_regression.to(dtype), proposals, proposal_counts, image_shapes,
            self.box_coder.weights, self.score_thresh, self.nms_thresh, self.detections_per_img,
            bbox_xform_clip=self.box_coder.bbox_xform_clip)

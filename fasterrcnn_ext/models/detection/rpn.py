"""The region proposal network: torchvision's RegionProposalNetwork (same submodules, state_dict keys, matching,
sampling and losses) with fasterrcnn_ext's anchors, box coder, IoU and the fused proposal selection.

Shapes: N images, L feature levels (H_l x W_l), A anchors per location, P proposals per image.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection import rpn as tv_rpn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RPNHead, concat_box_prediction_layers

from ... import ops
from ...ops.utils import tracing_by_value
from ._utils import BoxCoder, rebind
from .anchor_utils import AnchorGenerator

__all__ = ["RegionProposalNetwork", "RPNHead"]


class RegionProposalNetwork(tv_rpn.RegionProposalNetwork):
    """torchvision's RegionProposalNetwork on fasterrcnn_ext's kernels; the same arguments:

    Args:
        anchor_generator (AnchorGenerator): anchors of every level.
        head (nn.Module): objectness and box-regression convolutions (RPNHead).
        fg_iou_thresh, bg_iou_thresh (float): IoU of an anchor with a ground-truth box to be a positive or a
            negative for training.
        batch_size_per_image (int), positive_fraction (float): anchors sampled per image for the losses.
        pre_nms_top_n, post_nms_top_n (dict with "training" and "testing"): proposals kept per level before NMS and
            per image after it.
        nms_thresh (float): IoU threshold of the per-level NMS.
        score_thresh (float): minimum objectness (sigmoid) of a proposal.
    """

    def __init__(self, anchor_generator: AnchorGenerator, head: nn.Module, fg_iou_thresh: float,
                 bg_iou_thresh: float, batch_size_per_image: int, positive_fraction: float,
                 pre_nms_top_n: dict[str, int], post_nms_top_n: dict[str, int], nms_thresh: float,
                 score_thresh: float = 0.0):
        super().__init__(anchor_generator, head, fg_iou_thresh, bg_iou_thresh, batch_size_per_image,
                         positive_fraction, pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.box_similarity = ops.box_iou

    @classmethod
    def adopt(cls, rpn: tv_rpn.RegionProposalNetwork) -> RegionProposalNetwork:
        """This class over a torchvision RPN's submodules and settings (shared, not copied); ``rpn`` itself is left as
        it was."""
        ours = rebind(cls, rpn)
        ours.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        ours.box_similarity = ops.box_iou
        return ours

    @torch.jit.unused
    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's selection, in standard operations: used only under torch.jit.trace or the
        TorchScript-based ONNX exporter (forward selects with the fused rpn_proposals op otherwise)."""
        return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)

    def forward(self, images: ImageList, features: dict[str, Tensor],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Returns one Tensor[P_i, 4] of proposals per image and, in training, the RPN losses.

        Under torch.jit.trace or the TorchScript-based ONNX exporter (tracing_by_value()): torchvision's forward,
        whose every step has an ONNX form."""
        if not torch.jit.is_scripting():
            if tracing_by_value():
                return super().forward(images, features, targets)
        feature_maps = list(features.values())
        objectness, pred_bbox_deltas = self.head(feature_maps)
        return self._proposals(images, feature_maps, objectness, pred_bbox_deltas, targets)

    def forward_with_head(self, head: nn.Module, images: ImageList,
                          features: dict[str, Tensor]) -> tuple[list[Tensor], dict[str, Tensor]]:
        """forward in eval, with ``head`` run in place of self.head (the detector's inference copy of it)."""
        feature_maps = list(features.values())
        objectness, pred_bbox_deltas = head(feature_maps)
        return self._proposals(images, feature_maps, objectness, pred_bbox_deltas, None)

    @torch.jit.unused
    def padded_proposals(self, head: nn.Module, images: ImageList,
                         features: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The eval proposals with static sizes (FasterRCNN.detect_padded): Tensor[N, P, 4] with P =
        post_nms_top_n, image i's first counts[i] rows holding what forward gives it, and counts Tensor[N]."""
        feature_maps = list(features.values())
        objectness, pred_bbox_deltas = head(feature_maps)
        anchors, objectness_flat, deltas_flat, num_anchors_per_level = self._flat_predictions(
            images, feature_maps, objectness, pred_bbox_deltas)
        num_images = len(anchors)
        boxes, _, counts = ops.rpn_proposals_padded(
            objectness_flat.view(num_images, -1), deltas_flat.view(num_images, -1, 4), anchors[0],
            num_anchors_per_level, images.image_sizes, self.pre_nms_top_n(), self.post_nms_top_n(), self.nms_thresh,
            self.score_thresh, self.min_size, self.box_coder.weights, self.box_coder.bbox_xform_clip)
        return boxes, counts

    def _flat_predictions(self, images: ImageList, features: list[Tensor], objectness: list[Tensor],
                          pred_bbox_deltas: list[Tensor]) -> tuple[list[Tensor], Tensor, Tensor, list[int]]:
        """The batch's anchors, the head's outputs flattened as the proposal selection takes them ([N * A, 1] and
        [N * A, 4], levels concatenated, in the anchors' dtype) and the anchors of each level."""
        anchors = self.anchor_generator(images, features)
        num_anchors_per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
        objectness_flat, deltas_flat = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        if objectness_flat.dtype != anchors[0].dtype:  # half-precision heads (autocast): select in float32
            objectness_flat = objectness_flat.to(anchors[0].dtype)
            deltas_flat = deltas_flat.to(anchors[0].dtype)
        return anchors, objectness_flat, deltas_flat, num_anchors_per_level

    def _select(self, images: ImageList, anchors: list[Tensor], objectness_flat: Tensor, deltas_flat: Tensor,
                num_anchors_per_level: list[int]) -> list[Tensor]:
        num_images = len(anchors)
        boxes, _ = ops.rpn_proposals(
            objectness_flat.view(num_images, -1), deltas_flat.view(num_images, -1, 4), anchors[0],
            num_anchors_per_level, images.image_sizes, self.pre_nms_top_n(), self.post_nms_top_n(), self.nms_thresh,
            self.score_thresh, self.min_size, self.box_coder.weights, self.box_coder.bbox_xform_clip)
        return boxes

    def _proposals(self, images: ImageList, features: list[Tensor], objectness: list[Tensor],
                   pred_bbox_deltas: list[Tensor],
                   targets: list[dict[str, Tensor]] | None) -> tuple[list[Tensor], dict[str, Tensor]]:
        anchors, objectness_flat, deltas_flat, num_anchors_per_level = self._flat_predictions(
            images, features, objectness, pred_bbox_deltas)
        # Faster R-CNN does not backpropagate through the proposals: the selection sees detached tensors.
        boxes = self._select(images, anchors, objectness_flat.detach(), deltas_flat.detach(), num_anchors_per_level)
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("RegionProposalNetwork: targets are required in training mode")
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_objectness, loss_rpn_box_reg = self.compute_loss(objectness_flat, deltas_flat, labels,
                                                                  regression_targets)
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}
        return boxes, losses

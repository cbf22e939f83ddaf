"""BoxCoder on fasterrcnn_ext's encode/decode kernels, with torchvision's interface."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ... import ops
from ...ops.constants import BBOX_XFORM_CLIP
from ...ops.utils import ArgumentError


class BoxCoder:
    """torchvision.models.detection._utils.BoxCoder (same methods and results) on the fused box kernels.

    Args:
        weights ((wx, wy, ww, wh)): the regression targets are multiplied by these (deltas divided on decoding).
        bbox_xform_clip (float): upper bound of dw and dh before exp().
    """

    def __init__(self, weights: tuple[float, float, float, float], bbox_xform_clip: float = BBOX_XFORM_CLIP):
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, reference_boxes: list[Tensor], proposals: list[Tensor]) -> tuple[Tensor, ...]:
        boxes_per_image = [len(b) for b in reference_boxes]
        targets = self.encode_single(torch.cat(reference_boxes, dim=0), torch.cat(proposals, dim=0))
        return targets.split(boxes_per_image, 0)

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        return ops.encode_boxes(reference_boxes, proposals.to(reference_boxes.dtype), self.weights)

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        if not torch.jit.is_scripting():  # torchvision asserts both
            if not isinstance(boxes, (list, tuple)):
                raise ArgumentError(f"BoxCoder.decode: boxes must be a list of Tensor[K_i, 4], got "
                                    f"{type(boxes).__name__}")
            if not isinstance(rel_codes, Tensor):
                raise ArgumentError(f"BoxCoder.decode: rel_codes must be a Tensor, got {type(rel_codes).__name__}")
        concat_boxes = torch.cat(boxes, dim=0)
        box_sum = concat_boxes.shape[0]
        pred_boxes = self.decode_single(rel_codes.reshape(box_sum, -1), concat_boxes)
        return pred_boxes.reshape(box_sum, -1, 4) if box_sum > 0 else pred_boxes

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        # fp32 at least: the kernel computes in float32 (float64 for float64 codes).
        return ops.decode_boxes(rel_codes, boxes.to(rel_codes.dtype), self.weights, self.bbox_xform_clip)


def rebind(cls: type, module: nn.Module):
    """An instance of ``cls`` (a subclass of ``module``'s class) over ``module``'s submodules, parameters, buffers and
    settings, which are shared, not copied. ``module`` itself stays as it was: the registries that hold its
    submodules, parameters, buffers and hooks are copied, so assigning to the new instance does not reach it."""
    new = cls.__new__(cls)
    new.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()})
    return new

"""BoxCoder on fasterrcnn_ext's encode/decode kernels, with torchvision's interface."""

from __future__ import annotations

import math

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


def decodes_like_fused_ops(weights: tuple[float, float, float, float], bbox_xform_clip: float,
                           unit_weights: bool) -> bool:
    """Whether a box coder of these ``weights`` and exp clamp decodes as the fused post-processing ops do. They take
    the weights of the RoI heads' coder but fix the rest: the exp clamp of log(1000/16) and, for the RPN's selection
    (``unit_weights``), torchvision's unit weights. Scriptable: TorchScript's forward, which has no torchvision steps
    to fall back on, refuses a coder that fails it."""
    if bbox_xform_clip != math.log(1000.0 / 16):  # BBOX_XFORM_CLIP: TorchScript reads no global float
        return False
    return not unit_weights or (weights[0] == 1.0 and weights[1] == 1.0 and weights[2] == 1.0 and weights[3] == 1.0)


def fused_ops_decode_like(coder, unit_weights: bool = False) -> bool:
    """decodes_like_fused_ops for ``coder``: any object with torchvision's BoxCoder attributes, which a user may put
    in place of the default. One that differs sends the eager model to torchvision's steps, which decode with it."""
    weights = tuple(float(w) for w in coder.weights)
    return len(weights) == 4 and decodes_like_fused_ops(weights, float(coder.bbox_xform_clip), unit_weights)


def rebind(cls: type, module: nn.Module):
    """An instance of ``cls`` (a subclass of ``module``'s class) over ``module``'s submodules, parameters, buffers and
    settings, which are shared, not copied. ``module`` itself stays as it was: the registries that hold its
    submodules, parameters, buffers and hooks are copied, so assigning to the new instance does not reach it."""
    new = cls.__new__(cls)
    new.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()})
    return new

"""Multi-level RoIAlign for FPNs, mirroring torchvision.ops.MultiScaleRoIAlign, on one fused op.

Shapes: N images, C channels, L pyramid levels (level l is H_l x W_l), K RoIs, (PH, PW) output size.
"""

from __future__ import annotations

import math
import warnings

import torch
import torchvision
from torch import Tensor
from torchvision.ops.poolers import initLevelMapper

from .._library import ops as _ops
from ._registration import register_autograd, register_fake
from ._utils import check_boxes_fit_batch, pair, rois_from_boxes
from .constants import CANONICAL_LEVEL, CANONICAL_SCALE
from .roi_align import roi_align


def multi_scale_roi_align(features: list[Tensor], boxes: Tensor | list[Tensor], output_size, scales: list[float],
                          sampling_ratio: int = -1, aligned: bool = False,
                          canonical_scale: float = CANONICAL_SCALE, canonical_level: float = CANONICAL_LEVEL) -> Tensor:
    """RoIAlign of every RoI from its FPN level, in one op (no Python loop over levels, no host sync).

    Each RoI goes to level ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6)`` (FPN paper, eq. 1),
    clamped to the levels given; ``features[l]`` has spatial scale ``scales[l]`` (powers of 2 halving per level).

    Args:
        features (list of Tensor[N, C, H_l, W_l]): the pyramid, finest level first.
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): RoIs in image coordinates.
        output_size (int or (int, int)): (PH, PW).
        scales (list of float): the spatial scale of each level, e.g. [1/4, 1/8, 1/16, 1/32].

    Returns:
        Tensor[K, C, PH, PW].
    """
    ph, pw = pair(output_size)
    if features:
        check_boxes_fit_batch(boxes, features[0].size(0) if features[0].dim() == 4 else len(boxes),
                              "multi_scale_roi_align")
    rois = rois_from_boxes(boxes)
    return _ops().multi_scale_roi_align(list(features), rois, [float(s) for s in scales], ph, pw,
                                        int(sampling_ratio), bool(aligned), float(canonical_scale),
                                        float(canonical_level))


def infer_scale(feature: Tensor, original_size: tuple[int, int]) -> float:
    """The power-of-2 spatial scale of a feature map for an image of ``original_size`` (torchvision's rule)."""
    approx = feature.shape[-2] / original_size[0]
    return 2.0 ** round(math.log2(approx))


class MultiScaleRoIAlign(torchvision.ops.MultiScaleRoIAlign):
    """Multi-scale RoIAlign pooling for FPN detectors (torchvision.ops.MultiScaleRoIAlign), on a fused op.

    Args:
        featmap_names (list of str): names of the feature maps (keys of the dict given to forward) to pool from.
        output_size (int or (int, int)): (PH, PW).
        sampling_ratio (int): RoIAlign samples per bin side (<= 0: adaptive).
        canonical_scale (int): s0 of the FPN level rule (224, the ImageNet pre-training size).
        canonical_level (int): k0 of the FPN level rule (4: a 224x224 RoI comes from P4).

    As in torchvision, the scales are inferred from the first batch's shapes and then kept. A subclass of
    torchvision's, so torchvision's detection models accept it.
    """

    def __init__(self, featmap_names: list[str], output_size, sampling_ratio: int, *,
                 canonical_scale: int = CANONICAL_SCALE, canonical_level: int = CANONICAL_LEVEL):
        super().__init__(list(featmap_names), pair(output_size), sampling_ratio, canonical_scale=canonical_scale,
                         canonical_level=canonical_level)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """Pools ``boxes`` (one Tensor[L_i, 4] per image, image coordinates) from the named feature maps of ``x``.

        ``image_shapes`` are the (H, W) of the images after resizing (as in torchvision's ImageList).
        Returns Tensor[sum L_i, C, PH, PW].
        """
        features = [x[name] for name in self.featmap_names if name in x]
        if not features:
            raise ValueError(f"MultiScaleRoIAlign: none of the feature maps {self.featmap_names} is in the input "
                             f"(got {list(x)})")
        if isinstance(boxes, (list, tuple)) and len(image_shapes) != len(boxes):
            raise ValueError(f"MultiScaleRoIAlign: image_shapes has {len(image_shapes)} entries but boxes has "
                             f"{len(boxes)} per-image tensors: give one (height, width) per image")
        check_boxes_fit_batch(boxes, features[0].size(0) if features[0].dim() == 4 else len(boxes),
                              "MultiScaleRoIAlign")
        if self.scales is None:
            original = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
            self.scales = [infer_scale(f, original) for f in features]
        rois = rois_from_boxes(boxes)
        if len(features) == 1:
            return roi_align(features[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        if not _levels_fit_the_maps(self.scales):
            return self._pool_non_adjacent_levels(features, boxes, rois)
        return multi_scale_roi_align(features, rois, self.output_size, self.scales, self.sampling_ratio, False,
                                     self.canonical_scale, self.canonical_level)

    def _pool_non_adjacent_levels(self, features: list[Tensor], boxes: list[Tensor], rois: Tensor) -> Tensor:
        """torchvision's result for feature maps that skip a level (e.g. strides 8 and 32): a RoI whose FPN level is
        the i-th from the finest given pools from the i-th map given, and one whose level is past the number of maps
        pools to zeros. A Python loop over the levels, as torchvision's: the fused op needs every level."""
        if not self._warned_non_adjacent:
            self._warned_non_adjacent = True
            warnings.warn(f"MultiScaleRoIAlign: the feature maps at scales {self.scales} skip a pyramid level; as in "
                          "torchvision, RoIs are pooled from the map at their level's position among the maps given, "
                          "and RoIs of a level past the last map pool to zeros", UserWarning, stacklevel=3)
        k_min = int(round(-math.log2(self.scales[0])))
        k_max = int(round(-math.log2(self.scales[-1])))
        mapper = initLevelMapper(k_min, k_max, canonical_scale=self.canonical_scale,
                                 canonical_level=self.canonical_level)
        levels = mapper(boxes if isinstance(boxes, (list, tuple)) else [rois[:, 1:]])
        result = features[0].new_zeros((rois.size(0), features[0].size(1), *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.where(levels == level)[0]
            result[index] = roi_align(feature, rois[index], self.output_size, scale, self.sampling_ratio)
        return result

    _warned_non_adjacent = False

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio})")


def _levels_fit_the_maps(scales: list[float]) -> bool:
    """Whether every FPN level from the first map's to the last map's has a map at its position (level k pools from
    maps[k - k_min], as in torchvision), which the fused op needs: true for one map per level, and for maps that share
    a scale (MobileNetV3's two stride-32 maps: every RoI pools from the first)."""
    k_min, k_max = -math.log2(scales[0]), -math.log2(scales[-1])
    return k_min <= k_max and k_max - k_min < len(scales)


@register_fake("fasterrcnn_ext::multi_scale_roi_align")
def _multi_scale_roi_align_fake(features, rois, scales, pooled_height, pooled_width, sampling_ratio, aligned,
                                canonical_scale=CANONICAL_SCALE, canonical_level=CANONICAL_LEVEL):
    torch._check(len(features) == len(scales), lambda: "multi_scale_roi_align: one scale per feature map")
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: "multi_scale_roi_align: rois must be [K, 5]")
    return features[0].new_empty((rois.size(0), features[0].size(1), pooled_height, pooled_width))


@register_fake("fasterrcnn_ext::_multi_scale_roi_align_backward")
def _multi_scale_roi_align_backward_fake(grad, rois, scales, pooled_height, pooled_width, sampling_ratio, aligned,
                                         canonical_scale, canonical_level, batch_size, channels, heights, widths):
    return [grad.new_empty((batch_size, channels, h, w)) for h, w in zip(heights, widths)]


def _setup_context(ctx, inputs, output):
    # Some torch versions (2.11) leave arguments equal to their schema default out of `inputs`.
    features, rois, scales, pooled_height, pooled_width, sampling_ratio, aligned = inputs[:7]
    canonical_scale = inputs[7] if len(inputs) > 7 else float(CANONICAL_SCALE)
    canonical_level = inputs[8] if len(inputs) > 8 else float(CANONICAL_LEVEL)
    ctx.save_for_backward(rois)
    ctx.args = (scales, pooled_height, pooled_width, sampling_ratio, aligned, canonical_scale, canonical_level)
    ctx.shapes = [f.shape for f in features]


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    n, c = ctx.shapes[0][0], ctx.shapes[0][1]
    grads = torch.ops.fasterrcnn_ext._multi_scale_roi_align_backward(
        grad, rois, *ctx.args, n, c, [s[2] for s in ctx.shapes], [s[3] for s in ctx.shapes])
    # One gradient per input autograd saw (see _setup_context): the features' list, then None for the rest.
    return (list(grads),) + (None,) * (len(ctx.needs_input_grad) - 1)


register_autograd("fasterrcnn_ext::multi_scale_roi_align", _backward, _setup_context)

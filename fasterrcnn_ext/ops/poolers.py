"""Multi-level RoIAlign for FPNs, mirroring torchvision.ops.MultiScaleRoIAlign, on one fused op.

Shapes: N images, C channels, L pyramid levels (level l is H_l x W_l), K RoIs, (PH, PW) output size.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torch.jit.annotations import BroadcastingList2
from torchvision.ops.poolers import initLevelMapper

from .. import _torchvision
from .._library import assert_loaded
from ._onnx import tracing_by_value
from ._registration import register_autograd, register_fake
from ._utils import check_boxes_fit_batch, pair, roi_dtypes_match, rois_from_boxes
from .constants import CANONICAL_LEVEL, CANONICAL_SCALE
from .roi_align import roi_align


@torch.fx.wrap
def multi_scale_roi_align(features: list[Tensor], boxes: Tensor | list[Tensor], output_size: BroadcastingList2[int],
                          scales: list[float], sampling_ratio: int = -1, aligned: bool = False,
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
    if not torch.jit.is_scripting():
        assert_loaded()
        output_size = pair(output_size)
        features = list(features)
        scales = [float(s) for s in scales]
        if features:
            check_boxes_fit_batch(boxes, features[0].size(0) if features[0].dim() == 4 else len(boxes),
                                  "multi_scale_roi_align")
        if tracing_by_value():  # no ONNX form of the fused op: one RoIAlign per level, as torchvision's export
            return _pool_per_level(features, rois_from_boxes(boxes), output_size, sampling_ratio, scales,
                                   int(canonical_scale), int(canonical_level), aligned)
    rois = rois_from_boxes(boxes)
    return torch.ops.fasterrcnn_ext.multi_scale_roi_align(features, rois, scales, output_size[0], output_size[1],
                                                          int(sampling_ratio), bool(aligned), float(canonical_scale),
                                                          float(canonical_level))


def _log2(x: float) -> float:
    return math.log(x) / math.log(2.0)  # TorchScript has no math.log2


def power_of_2_scale(approx: float) -> float:
    """The power of 2 nearest ``approx`` in log scale: a feature map's spatial scale (torchvision's rule)."""
    return 2.0 ** float(round(_log2(approx)))


def infer_scale(feature: Tensor, original_size: list[int]) -> float:
    """The power-of-2 spatial scale of a feature map for an image of ``original_size`` (torchvision's rule)."""
    return power_of_2_scale(float(feature.shape[-2]) / float(original_size[0]))


@torch.fx.wrap
def _filter_input(x: dict[str, Tensor], featmap_names: list[str]) -> list[Tensor]:
    features: list[Tensor] = []
    for name in featmap_names:
        if name in x:
            features.append(x[name])
    if not torch.jit.is_scripting() and not features:
        raise ValueError(f"MultiScaleRoIAlign: none of the feature maps {featmap_names} is in the input "
                         f"(got {list(x)})")
    return features


@torch.fx.wrap
def _infer_scales(features: list[Tensor], image_shapes: list[tuple[int, int]]) -> list[float]:
    """The scale of each feature map, from the largest image of the batch (as torchvision's MultiScaleRoIAlign)."""
    max_height = 0
    max_width = 0
    for shape in image_shapes:
        max_height = max(max_height, shape[0])
        max_width = max(max_width, shape[1])
    return [infer_scale(f, [max_height, max_width]) for f in features]


def _check_pool_arguments(features: list[Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> None:
    if isinstance(boxes, (list, tuple)) and len(image_shapes) != len(boxes):
        raise ValueError(f"MultiScaleRoIAlign: image_shapes has {len(image_shapes)} entries but boxes has "
                         f"{len(boxes)} per-image tensors: give one (height, width) per image")
    check_boxes_fit_batch(boxes, features[0].size(0) if features[0].dim() == 4 else len(boxes), "MultiScaleRoIAlign")


@torch.fx.wrap
def _multi_scale_pool(features: list[Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]],
                      output_size: list[int], sampling_ratio: int, scales: list[float], canonical_scale: int,
                      canonical_level: int) -> Tensor:
    """MultiScaleRoIAlign's pooling once the scales are known: one RoIAlign for one map, the fused op for maps of
    consecutive levels, torchvision's per-level loop for maps that skip a level."""
    if not torch.jit.is_scripting():
        _check_pool_arguments(features, boxes, image_shapes)
    rois = rois_from_boxes(boxes)
    # float16/bfloat16 maps (a detector converted with .half() or .bfloat16(), or under autocast) with float32 boxes
    # go to the ops as they are: the kernels read the maps in their dtype and accumulate in float32, and the boxes
    # keep their float32 coordinates (bfloat16 ones step by 4 pixels at 1000).
    return _pool_levels(features, rois, output_size, sampling_ratio, scales, canonical_scale, canonical_level)


def _pool_levels(features: list[Tensor], rois: Tensor, output_size: list[int], sampling_ratio: int,
                 scales: list[float], canonical_scale: int, canonical_level: int) -> Tensor:
    if len(features) == 1:
        return roi_align(features[0], rois, output_size, scales[0], sampling_ratio)
    if not _levels_fit_the_maps(scales):
        return _pool_non_adjacent_levels(features, rois, output_size, sampling_ratio, scales, canonical_scale,
                                         canonical_level)
    return multi_scale_roi_align(features, rois, output_size, scales, sampling_ratio, False, float(canonical_scale),
                                 float(canonical_level))


class MultiScaleRoIAlign(_torchvision.MultiScaleRoIAlign):
    """Multi-scale RoIAlign pooling for FPN detectors (torchvision.ops.MultiScaleRoIAlign), on a fused op.

    Args:
        featmap_names (list of str): names of the feature maps (keys of the dict given to forward) to pool from.
        output_size (int or (int, int)): (PH, PW).
        sampling_ratio (int): RoIAlign samples per bin side (<= 0: adaptive).
        canonical_scale (int): s0 of the FPN level rule (224, the ImageNet pre-training size).
        canonical_level (int): k0 of the FPN level rule (4: a 224x224 RoI comes from P4).

    As in torchvision, the scales are inferred from the first batch's shapes and then kept. A subclass of
    torchvision's, so torchvision's detection models accept it; it scripts (torch.jit.script) and is an FX leaf. Unlike
    torchvision's, it takes float16/bfloat16 maps with float32 boxes (a detector converted with ``.half()``, whose
    boxes stay float32): it reads the maps in their dtype, accumulates in float32 and returns their dtype.
    """

    def __init__(self, featmap_names: list[str], output_size: BroadcastingList2[int], sampling_ratio: int, *,
                 canonical_scale: int = CANONICAL_SCALE, canonical_level: int = CANONICAL_LEVEL):
        super().__init__(list(featmap_names), pair(output_size), sampling_ratio, canonical_scale=canonical_scale,
                         canonical_level=canonical_level)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """Pools ``boxes`` (one Tensor[L_i, 4] per image, image coordinates) from the named feature maps of ``x``.

        ``image_shapes`` are the (H, W) of the images after resizing (as in torchvision's ImageList).
        Returns Tensor[sum L_i, C, PH, PW].
        """
        features = _filter_input(x, self.featmap_names)
        scales = self.scales
        if scales is None:
            scales = _infer_scales(features, image_shapes)
            if torch.jit.is_scripting():
                self.scales = scales
            elif not isinstance(scales, torch.fx.Proxy):  # an FX trace leaves the module as it was
                self.scales = scales
        return _multi_scale_pool(features, boxes, image_shapes, [self.output_size[0], self.output_size[1]],
                                 self.sampling_ratio, scales, self.canonical_scale, self.canonical_level)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio})")


_warned_non_adjacent = [False]  # a list, not a bool global: TorchScript compiles none of this (eager only)


def _warn_non_adjacent_once(scales: list[float]) -> None:
    if not _warned_non_adjacent[0]:
        _warned_non_adjacent[0] = True
        warnings.warn(f"MultiScaleRoIAlign: the feature maps at scales {scales} skip a pyramid level; as in "
                      "torchvision, RoIs are pooled from the map at their level's position among the maps given, "
                      "and RoIs of a level past the last map pool to zeros", UserWarning, stacklevel=4)


def _pool_non_adjacent_levels(features: list[Tensor], rois: Tensor, output_size: list[int], sampling_ratio: int,
                              scales: list[float], canonical_scale: int, canonical_level: int) -> Tensor:
    """torchvision's result for feature maps that skip a level (e.g. strides 8 and 32): a RoI whose FPN level is
    the i-th from the finest given pools from the i-th map given, and one whose level is past the number of maps
    pools to zeros."""
    if not torch.jit.is_scripting():
        _warn_non_adjacent_once(scales)
    return _pool_per_level(features, rois, output_size, sampling_ratio, scales, canonical_scale, canonical_level,
                           False)


def _pool_per_level(features: list[Tensor], rois: Tensor, output_size: list[int], sampling_ratio: int,
                    scales: list[float], canonical_scale: int, canonical_level: int, aligned: bool) -> Tensor:
    """The FPN level rule, then one RoIAlign per level (torchvision's MultiScaleRoIAlign): for maps that skip a
    level (the fused op needs every level) and under the TorchScript-based ONNX exporter (tracing_by_value())."""
    k_min = int(round(-_log2(scales[0])))
    k_max = int(round(-_log2(scales[-1])))
    mapper = initLevelMapper(k_min, k_max, canonical_scale=canonical_scale, canonical_level=canonical_level)
    levels = mapper([rois[:, 1:]])
    result = features[0].new_zeros((rois.size(0), features[0].size(1), output_size[0], output_size[1]))
    for level, feature in enumerate(features):
        index = torch.where(levels == level)[0]
        result[index] = roi_align(feature, rois[index], output_size, scales[level], sampling_ratio, aligned)
    return result


def _levels_fit_the_maps(scales: list[float]) -> bool:
    """Whether every FPN level from the first map's to the last map's has a map at its position (level k pools from
    maps[k - k_min], as in torchvision), which the fused op needs: true for one map per level, and for maps that share
    a scale (MobileNetV3's two stride-32 maps: every RoI pools from the first)."""
    k_min = round(-_log2(scales[0]))
    k_max = round(-_log2(scales[-1]))
    return k_min <= k_max and k_max - k_min < len(scales)


@register_fake("fasterrcnn_ext::multi_scale_roi_align")
def _multi_scale_roi_align_fake(features, rois, scales, pooled_height, pooled_width, sampling_ratio, aligned,
                                canonical_scale=CANONICAL_SCALE, canonical_level=CANONICAL_LEVEL):
    torch._check(len(features) == len(scales), lambda: "multi_scale_roi_align: one scale per feature map")
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: "multi_scale_roi_align: rois must be [K, 5]")
    torch._check(all(roi_dtypes_match(f.dtype, rois.dtype) for f in features),
                 lambda: "multi_scale_roi_align: rois must have the features' dtype, or be float32 for "
                         "float16/bfloat16 features")
    return features[0].new_empty((rois.size(0), features[0].size(1), pooled_height, pooled_width))


@register_fake("fasterrcnn_ext::_multi_scale_roi_align_backward")
def _multi_scale_roi_align_backward_fake(grad, rois, scales, pooled_height, pooled_width, sampling_ratio, aligned,
                                         canonical_scale, canonical_level, batch_size, channels, heights, widths):
    return [grad.new_empty((batch_size, channels, h, w)) for h, w in zip(heights, widths)]


@register_fake("fasterrcnn_ext::_roi_align_backward_fixed_point")
def _roi_align_backward_fixed_point_fake(grad, rois, scales, pooled_height, pooled_width, sampling_ratio, aligned,
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

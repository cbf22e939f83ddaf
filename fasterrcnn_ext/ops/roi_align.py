"""RoIAlign (Mask R-CNN), mirroring torchvision.ops.roi_align.

Shapes: N images, C channels, H x W feature map, K RoIs, (PH, PW) output size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2

from .._library import assert_loaded
from ._registration import register_autograd, register_fake
from ._utils import check_boxes_fit_batch, pair, roi_dtypes_match, rois_from_boxes


@torch.fx.wrap
def roi_align(input: Tensor, boxes: Tensor | list[Tensor], output_size: BroadcastingList2[int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Pools each RoI to a fixed ``output_size`` by bilinear sampling (RoIAlign, Mask R-CNN).

    Args:
        input (Tensor[N, C, H, W]): feature map; float16, bfloat16, float32 or float64 (half types are read as they
            are and accumulate in float32). NCHW or channels_last. Quantized (quint8, qint8, qint32; CPU) as
            torchvision: one image (N = 1), pooled from the integer values and requantized with the input's scale
            and zero point.
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): RoIs in (x1, y1, x2, y2) image coordinates; the [K, 5] form has
            the batch index first. Same dtype as ``input``, or float32 for float16/bfloat16 ``input`` (coordinates
            keep float32 precision). Quantized ``input``: quantized rois of its dtype.
        output_size (int or (int, int)): (PH, PW).
        spatial_scale (float): feature-map size / image size, e.g. 1/16 for stride 16.
        sampling_ratio (int): samples per bin side; <= 0 uses ceil(bin size) (capped at 2 * max(H, W) + 2, so NaN or
            enormous boxes finish promptly).
        aligned (bool): shift the boxes by half a pixel so pixel centres align (recommended; False is legacy).

    Returns:
        Tensor[K, C, PH, PW]: same values as torchvision.ops.roi_align.

    Raises:
        RuntimeError: a batch index outside [0, N), a wrong shape, a non-positive output size or spatial_scale, a
            dtype mismatch, integer input.
    """
    if not torch.jit.is_scripting():
        assert_loaded()
        output_size = pair(output_size)
        check_boxes_fit_batch(boxes, input.size(0) if input.dim() == 4 else len(boxes), "roi_align")
    rois = rois_from_boxes(boxes)
    return torch.ops.fasterrcnn_ext.roi_align(input, rois, float(spatial_scale), output_size[0], output_size[1],
                                              int(sampling_ratio), bool(aligned))


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align` (torchvision.ops.RoIAlign)."""

    def __init__(self, output_size: BroadcastingList2[int], spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})")


@register_fake("fasterrcnn_ext::roi_align")
def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: f"roi_align: rois must be [K, 5], got {rois.shape}")
    torch._check(roi_dtypes_match(input.dtype, rois.dtype),
                 lambda: f"roi_align: rois must have input's dtype, or be float32 for float16/bfloat16 input, got "
                         f"{input.dtype} and {rois.dtype}")
    return input.new_empty((rois.size(0), input.size(1), pooled_height, pooled_width))


@register_fake("fasterrcnn_ext::_roi_align_backward")
def _roi_align_backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height,
                             width, sampling_ratio, aligned):
    return grad.new_empty((batch_size, channels, height, width))


@register_fake("fasterrcnn_ext::_roi_align_per_element")
def _roi_align_per_element_fake(features, rois, scales, pooled_height, pooled_width, sampling_ratio, aligned,
                                canonical_scale, canonical_level, table_bytes):
    torch._check(len(features) == len(scales) and len(features) > 0,
                 lambda: "_roi_align_per_element: one scale per feature map")
    torch._check(rois.dim() == 2 and rois.size(1) == 5,
                 lambda: f"_roi_align_per_element: rois must be [K, 5], got {rois.shape}")
    return features[0].new_empty((rois.size(0), features[0].size(1), pooled_height, pooled_width))


def _roi_align_setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.args = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
    ctx.input_shape = input.shape


def _roi_align_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.args
    n, c, h, w = ctx.input_shape
    grad_input = torch.ops.fasterrcnn_ext._roi_align_backward(
        grad, rois, spatial_scale, pooled_height, pooled_width, n, c, h, w, sampling_ratio, aligned)
    return grad_input, None, None, None, None, None, None


register_autograd("fasterrcnn_ext::roi_align", _roi_align_backward, _roi_align_setup_context)

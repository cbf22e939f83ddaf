"""RoIPool (Fast R-CNN), mirroring torchvision.ops.roi_pool.

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
def roi_pool(input: Tensor, boxes: Tensor | list[Tensor], output_size: BroadcastingList2[int],
             spatial_scale: float = 1.0) -> Tensor:
    """Max-pools each RoI into a fixed ``output_size`` grid of bins (RoIPool, Fast R-CNN).

    Args:
        input (Tensor[N, C, H, W]): feature map (NCHW or channels_last), any floating dtype (float16/bfloat16 are
            read as they are and compared in float32).
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): RoIs in image coordinates, same dtype as ``input``, or float32
            for float16/bfloat16 ``input``.
        output_size (int or (int, int)): (PH, PW).
        spatial_scale (float): feature-map size / image size.

    Returns:
        Tensor[K, C, PH, PW]: exactly torchvision.ops.roi_pool's values. Empty bins are 0.
    """
    if not torch.jit.is_scripting():
        assert_loaded()
        if input.is_quantized:  # torchvision has no quantized RoIPool either (only RoIAlign and NMS)
            raise NotImplementedError(f"roi_pool: quantized input ({input.dtype}) is not supported; dequantize it "
                                      "first (torchvision's roi_pool takes no quantized tensors either)")
        output_size = pair(output_size)
        check_boxes_fit_batch(boxes, input.size(0) if input.dim() == 4 else len(boxes), "roi_pool")
    rois = rois_from_boxes(boxes)
    # Under ONNX export no backward follows, and the argmax has no ONNX form: the values alone.
    if torch.is_grad_enabled() and input.requires_grad and not _in_onnx_export():
        output, _ = torch.ops.fasterrcnn_ext.roi_pool(input, rois, float(spatial_scale), output_size[0],
                                                      output_size[1])
        return output
    # No gradient wanted (inference): the op that does not write the argmax, only the backward's input.
    return torch.ops.fasterrcnn_ext._roi_pool_values(input, rois, float(spatial_scale), output_size[0],
                                                     output_size[1])


@torch.jit.unused
def _onnx_export_flag() -> bool:
    return torch.onnx.is_in_onnx_export()


def _in_onnx_export() -> bool:
    if torch.jit.is_scripting():
        return False
    return _onnx_export_flag()


class RoIPool(nn.Module):
    """Module form of :func:`roi_pool` (torchvision.ops.RoIPool)."""

    def __init__(self, output_size: BroadcastingList2[int], spatial_scale: float):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale})"


@register_fake("fasterrcnn_ext::roi_pool")
def _roi_pool_fake(input, rois, spatial_scale, pooled_height, pooled_width):
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: f"roi_pool: rois must be [K, 5], got {rois.shape}")
    torch._check(roi_dtypes_match(input.dtype, rois.dtype),
                 lambda: f"roi_pool: rois must have input's dtype, or be float32 for float16/bfloat16 input, got "
                         f"{input.dtype} and {rois.dtype}")
    shape = (rois.size(0), input.size(1), pooled_height, pooled_width)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.long)


@register_fake("fasterrcnn_ext::_roi_pool_values")
def _roi_pool_values_fake(input, rois, spatial_scale, pooled_height, pooled_width):
    output, _ = _roi_pool_fake(input, rois, spatial_scale, pooled_height, pooled_width)
    return output


@register_fake("fasterrcnn_ext::_roi_pool_backward")
def _roi_pool_backward_fake(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels,
                            height, width):
    return grad.new_empty((batch_size, channels, height, width))


@register_fake("fasterrcnn_ext::_roi_pool_backward_fixed_point")
def _roi_pool_backward_fixed_point_fake(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size,
                                        channels, height, width):
    return grad.new_empty((batch_size, channels, height, width))


def _roi_pool_setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width = inputs
    _, argmax = output
    ctx.save_for_backward(rois, argmax)
    ctx.args = (spatial_scale, pooled_height, pooled_width)
    ctx.input_shape = input.shape


def _roi_pool_backward(ctx, grad, grad_argmax):
    rois, argmax = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width = ctx.args
    n, c, h, w = ctx.input_shape
    grad_input = torch.ops.fasterrcnn_ext._roi_pool_backward(
        grad, rois, argmax, spatial_scale, pooled_height, pooled_width, n, c, h, w)
    return grad_input, None, None, None, None


register_autograd("fasterrcnn_ext::roi_pool", _roi_pool_backward, _roi_pool_setup_context)

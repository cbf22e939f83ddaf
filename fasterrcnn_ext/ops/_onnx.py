"""ONNX forms of the ops for the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): each maps to
the standard ONNX operators that torchvision's own symbolics use, so onnxruntime (or any ONNX runtime) runs the
exported model without a custom-op library.

- roi_align: RoiAlign (opset 11; from opset 16 with coordinate_transformation_mode, which aligned=True needs).
- roi_pool: MaxRoiPool.
- nms: NonMaxSuppression (``max_keep`` as max_output_boxes_per_class).
- batched_nms: NonMaxSuppression over boxes offset per class (torchvision's export trick), so boxes of different
  classes never overlap; float32, exact while ``class id * (largest coordinate + 1)`` stays well within float32's
  24-bit mantissa, as in torchvision.

The other ops have no ONNX form of their own: under export the Python wrappers and the detector take paths built
from standard torch operations instead (``exporting()`` below; multi_scale_roi_align becomes one RoiAlign per level).
"""

from __future__ import annotations

import sys

import torch
from torch.onnx import symbolic_opset11 as opset11
from torch.onnx.symbolic_helper import parse_args

# onnx.TensorProto's data type codes, the `to` of Cast in both exporters (ops/_onnxscript.py too).
_FLOAT = int(torch.onnx.TensorProtoDataType.FLOAT)
_INT64 = int(torch.onnx.TensorProtoDataType.INT64)


def exporting() -> bool:
    """Whether the caller runs under torch.onnx.export (either exporter) or torch.jit.trace: the box operations
    (IoU, clipping, coding) then take torchvision's paths, in standard operations."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def tracing_by_value() -> bool:
    """Whether the caller runs under torch.jit.trace or the TorchScript-based ONNX exporter, which record the
    operations that run on real tensors: the fused ops' data-dependent output sizes would be frozen, so the detector
    and the poolers take the paths of standard operations. Under torch.export and the dynamo ONNX exporter (which
    traces through fake kernels, and translates the fused ops with ops/_onnxscript.py) this is False."""
    return torch.jit.is_tracing() or (torch.onnx.is_in_onnx_export() and not torch.compiler.is_compiling())


def _constant(g, values, dtype):
    return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))


def _non_max_suppression(g, boxes, scores, iou_threshold: float, max_keep: int):
    """Indices kept by ONNX NonMaxSuppression over one batch and one class, by decreasing score."""
    boxes = opset11.unsqueeze(g, g.op("Cast", boxes, to_i=_FLOAT), 0)  # [1, N, 4]
    scores = opset11.unsqueeze(g, opset11.unsqueeze(g, g.op("Cast", scores, to_i=_FLOAT), 0), 0)  # [1, 1, N]
    limit = sys.maxsize if max_keep < 0 else max_keep
    selected = g.op("NonMaxSuppression", boxes, scores, _constant(g, [limit], torch.long),
                    _constant(g, [iou_threshold], torch.float))  # [K, 3]: (batch, class, box index)
    return opset11.squeeze(g, opset11.select(g, selected, 1, _constant(g, [2], torch.long)), 1)


@parse_args("v", "v", "f", "i")
def _nms(g, boxes, scores, iou_threshold, max_keep):
    return _non_max_suppression(g, boxes, scores, iou_threshold, max_keep)


@parse_args("v", "v", "v", "f", "i")
def _batched_nms(g, boxes, scores, idxs, iou_threshold, max_keep):
    boxes = g.op("Cast", boxes, to_i=_FLOAT)
    span = g.op("Add", g.op("ReduceMax", boxes, keepdims_i=0), _constant(g, 1.0, torch.float))
    offsets = g.op("Mul", g.op("Cast", idxs, to_i=_FLOAT), span)
    shifted = g.op("Add", boxes, opset11.unsqueeze(g, offsets, 1))
    return _non_max_suppression(g, shifted, scores, iou_threshold, max_keep)


def _roi_align_inputs(g, rois):
    batch_indices = opset11.squeeze(g, opset11.select(g, rois, 1, _constant(g, [0], torch.long)), 1)
    boxes = opset11.select(g, rois, 1, _constant(g, [1, 2, 3, 4], torch.long))
    return boxes, g.op("Cast", batch_indices, to_i=_INT64)


@parse_args("v", "v", "f", "i", "i", "i", "b")
def _roi_align_opset11(g, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    if aligned:
        # Before opset 16 RoiAlign has no half-pixel mode: the result would silently be aligned=False's.
        raise torch.onnx.errors.SymbolicValueError(
            "fasterrcnn_ext::roi_align with aligned=True needs ONNX opset 16 or later (RoiAlign's "
            "coordinate_transformation_mode); export with opset_version >= 16", input)
    boxes, batch_indices = _roi_align_inputs(g, rois)
    return g.op("RoiAlign", input, boxes, batch_indices, spatial_scale_f=spatial_scale,
                output_height_i=pooled_height, output_width_i=pooled_width, sampling_ratio_i=max(sampling_ratio, 0))


@parse_args("v", "v", "f", "i", "i", "i", "b")
def _roi_align_opset16(g, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    boxes, batch_indices = _roi_align_inputs(g, rois)
    # sampling_ratio <= 0 is adaptive in both (ONNX spells it 0).
    return g.op("RoiAlign", input, boxes, batch_indices,
                coordinate_transformation_mode_s="half_pixel" if aligned else "output_half_pixel",
                spatial_scale_f=spatial_scale, output_height_i=pooled_height, output_width_i=pooled_width,
                sampling_ratio_i=max(sampling_ratio, 0))


def _max_roi_pool(g, input, rois, spatial_scale, pooled_height, pooled_width):
    return g.op("MaxRoiPool", input, rois, pooled_shape_i=(pooled_height, pooled_width),
                spatial_scale_f=spatial_scale)


@parse_args("v", "v", "f", "i", "i")
def _roi_pool(g, input, rois, spatial_scale, pooled_height, pooled_width):
    return _max_roi_pool(g, input, rois, spatial_scale, pooled_height, pooled_width), None


@parse_args("v", "v", "f", "i", "i")
def _roi_pool_values(g, input, rois, spatial_scale, pooled_height, pooled_width):
    return _max_roi_pool(g, input, rois, spatial_scale, pooled_height, pooled_width)


def register() -> None:
    """Registers the symbolics with torch.onnx (from the opset each needs on)."""
    for name, fn, opset in [("nms", _nms, 11), ("batched_nms", _batched_nms, 11),
                            ("roi_align", _roi_align_opset11, 11), ("roi_align", _roi_align_opset16, 16),
                            ("roi_pool", _roi_pool, 11), ("_roi_pool_values", _roi_pool_values, 11)]:
        torch.onnx.register_custom_op_symbolic(f"fasterrcnn_ext::{name}", fn, opset)

"""ONNX forms of the ops for the torch.export-based exporter (``torch.onnx.export(..., dynamo=True)``), as onnxscript
functions on standard ONNX operators (opset 18): ``onnx_translations()`` is the ``custom_translation_table``, and
importing fasterrcnn_ext registers them in onnxscript's default torch_lib registry (when onnxscript loads), so a plain
``torch.onnx.export(model, args, path)`` uses them with no table passed.

The exporter calls each function with the node's arguments (tensors as symbolic values, int/float/SymInt arguments
as Python numbers or, for a size known only at run time, a symbolic int64 scalar) and records the ONNX operators it
calls. Each function computes what the op's kernel computes, in torchvision's order of operations:

- anchor_grid: Range, outer sum of the shifts and the cell anchors.
- rpn_proposals: per level TopK of the logits; decode, clip, small-box and score filters; NonMaxSuppression over boxes
  offset per level (torchvision's export trick); at most post_nms_top_n per image.
- detection_postprocess: Softmax, decode, clip, background dropped, score and size filters, NonMaxSuppression over
  boxes offset per class, detections_per_img per image.
- split_per_image: Split by the counts. roi_align: RoiAlign. multi_scale_roi_align: the FPN level rule, then one
  RoiAlign per level scattered into the result. roi_pool: MaxRoiPool. nms, batched_nms: NonMaxSuppression.

Two places differ from the kernels, as torchvision's own export does: ONNX has no log2 (log(x) / log(2) in the level
rule) and TopK and NonMaxSuppression may order exactly tied scores differently. NaN logits or deltas, which the
kernels drop, are not filtered.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import math
import sys
import warnings

import torch

from ._onnx import _FLOAT, _INT64
from .constants import BBOX_XFORM_CLIP, CANONICAL_LEVEL, CANONICAL_SCALE, FPN_LEVEL_EPS
from .postprocess import RPN_WEIGHTS

_NO_LIMIT = 2**62  # max_output_boxes_per_class when every box may be kept


def onnx_translations() -> dict:
    """{op overload: onnxscript function} for ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``;
    imports onnxscript (a dependency of the dynamo exporter)."""
    global op
    from onnxscript import opset18

    op = opset18
    ops = torch.ops.fasterrcnn_ext
    return {
        ops.anchor_grid.default: anchor_grid,
        ops.rpn_proposals.default: rpn_proposals,
        ops.detection_postprocess.default: detection_postprocess,
        ops.split_per_image.default: split_per_image,
        ops.roi_align.default: roi_align,
        ops.multi_scale_roi_align.default: multi_scale_roi_align,
        ops.roi_pool.default: roi_pool,
        ops._roi_pool_values.default: roi_pool_values,
        ops.nms.default: nms,
        ops.batched_nms.default: batched_nms,
    }


op = None  # onnxscript.opset18, bound by onnx_translations()

# The module whose import fills onnxscript's default torch_lib registry; torch.onnx.export imports it and then
# reads that registry for every export, so our translations registered there are the default ones.
_TORCHLIB_OPS = "onnxscript.function_libs.torch_lib.ops"
_registered = False


def register_default_translations() -> None:
    """Adds ``onnx_translations()`` to onnxscript's default torch_lib registry, from which ``torch.onnx.export``
    (dynamo=True, torch's default) builds its registry: a plain ``torch.onnx.export(model, args, path)`` then
    translates our ops without a ``custom_translation_table``. Idempotent; imports onnxscript."""
    global _registered
    if _registered:
        return
    import onnxscript
    from onnxscript.function_libs.torch_lib import _constants, registration

    opset = onnxscript.values.Opset(domain=_constants.DOMAIN, version=1)
    for target, function in onnx_translations().items():
        registration.default_registry.register(onnxscript.values.TracedOnnxFunction(opset, function),
                                               target.name())
    _registered = True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers the translations once onnxscript's torch_lib ops are imported (by torch.onnx.export), so that
    importing fasterrcnn_ext does not import onnxscript (about a second)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TORCHLIB_OPS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                register_default_translations()
            except Exception as e:  # never break onnxscript's import: the export then names the missing op
                warnings.warn(f"fasterrcnn_ext: could not register the ops' ONNX translations with onnxscript: {e}",
                              stacklevel=2)

        spec.loader.exec_module = exec_then_register
        return spec


def register_when_onnxscript_loads() -> None:
    """Registers the default translations now if onnxscript's torch_lib is imported, else when it is."""
    if _TORCHLIB_OPS in sys.modules:
        register_default_translations()
    elif importlib.util.find_spec("onnxscript") is not None and not any(
            isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _scalar(value, dtype=_INT64):
    """A 1-D tensor of one element from a Python number or a symbolic scalar."""
    if isinstance(value, (int, float)):
        if dtype == _FLOAT:
            return op.Constant(value_floats=[float(value)])
        return op.Constant(value_ints=[int(value)])
    return op.Reshape(op.Cast(value, to=dtype), op.Constant(value_ints=[1]))


def _ints(*values: int):
    return op.Constant(value_ints=[int(v) for v in values])


def _float_like(value: float, like):
    return op.CastLike(op.Constant(value_float=float(value)), like)


def _column(x, i: int):
    """x[:, i] of a [K, 4] tensor, as [K]."""
    return op.Squeeze(op.Slice(x, [i], [i + 1], [1]), [1])


def _sizes(values) -> tuple:
    return tuple(_scalar(v) for v in values)


def _decode(deltas, boxes, weights, clip: float):
    """torchvision's BoxCoder.decode_single: deltas [K, 4] on boxes [K, 4] -> [K, 4]."""
    widths = op.Sub(_column(boxes, 2), _column(boxes, 0))
    heights = op.Sub(_column(boxes, 3), _column(boxes, 1))
    half = _float_like(0.5, widths)
    ctr_x = op.Add(_column(boxes, 0), op.Mul(half, widths))
    ctr_y = op.Add(_column(boxes, 1), op.Mul(half, heights))
    dx = op.Div(_column(deltas, 0), _float_like(weights[0], widths))
    dy = op.Div(_column(deltas, 1), _float_like(weights[1], widths))
    dw = op.Min(op.Div(_column(deltas, 2), _float_like(weights[2], widths)), _float_like(clip, widths))
    dh = op.Min(op.Div(_column(deltas, 3), _float_like(weights[3], widths)), _float_like(clip, widths))
    pred_ctr_x = op.Add(op.Mul(dx, widths), ctr_x)
    pred_ctr_y = op.Add(op.Mul(dy, heights), ctr_y)
    half_w = op.Mul(half, op.Mul(op.Exp(dw), widths))
    half_h = op.Mul(half, op.Mul(op.Exp(dh), heights))
    return op.Concat(*[op.Unsqueeze(c, [1]) for c in (op.Sub(pred_ctr_x, half_w), op.Sub(pred_ctr_y, half_h),
                                                      op.Add(pred_ctr_x, half_w), op.Add(pred_ctr_y, half_h))],
                     axis=1)


def _clip(boxes, height, width):
    """Boxes [..., 4] clamped to x in [0, width], y in [0, height] (height, width: 1-D int64)."""
    zero = _float_like(0.0, boxes)
    limit = op.Concat(op.CastLike(width, boxes), op.CastLike(height, boxes), op.CastLike(width, boxes),
                      op.CastLike(height, boxes), axis=0)
    return op.Min(op.Max(boxes, zero), limit)


def _select(x, keep):
    """x[keep] along dim 0 (keep: a bool mask)."""
    return op.Compress(x, keep, axis=0)


def _big_enough(boxes, min_size: float):
    size = _float_like(min_size, boxes)
    return op.And(op.GreaterOrEqual(op.Sub(_column(boxes, 2), _column(boxes, 0)), size),
                  op.GreaterOrEqual(op.Sub(_column(boxes, 3), _column(boxes, 1)), size))


def _nms_indices(boxes, scores, iou_threshold: float, max_keep):
    """Indices [K] kept by NonMaxSuppression of one class, by decreasing score."""
    boxes = op.Unsqueeze(op.Cast(boxes, to=_FLOAT), [0])
    scores = op.Unsqueeze(op.Cast(scores, to=_FLOAT), [0, 1])
    limit = _scalar(_NO_LIMIT if isinstance(max_keep, int) and max_keep < 0 else max_keep)
    selected = op.NonMaxSuppression(boxes, scores, limit, op.Constant(value_floats=[float(iou_threshold)]))
    return op.Squeeze(op.Slice(selected, [2], [3], [1]), [1])


def _offset_by_class(boxes, idxs):
    """torchvision's batched NMS trick: boxes of different classes moved apart so that they never overlap (class c
    into [lowest + c * span, largest + c * span], span = largest - lowest + 1: negative coordinates too)."""
    # A 0 joins the coordinates so that no boxes (whose ReduceMax would be -inf) give a finite span.
    flat = op.Concat(op.Reshape(boxes, [-1]), op.Reshape(_float_like(0.0, boxes), [1]), axis=0)
    span = op.Add(op.Sub(op.ReduceMax(flat, keepdims=0), op.ReduceMin(flat, keepdims=0)), _float_like(1.0, boxes))
    return op.Add(boxes, op.Unsqueeze(op.Mul(op.CastLike(idxs, boxes), span), [1]))


def _batched_nms_indices(boxes, scores, idxs, iou_threshold: float, max_keep):
    return _nms_indices(_offset_by_class(boxes, idxs), scores, iou_threshold, max_keep)


def _count(x):
    return op.Shape(x, start=0, end=1)


# --------------------------------------------------------------------------------------------------------------
# The ops


def anchor_grid(cell_anchors, grid_sizes, strides):
    levels = []
    for level, cell in enumerate(cell_anchors):
        height, width = _sizes(grid_sizes[2 * level:2 * level + 2])
        stride_y, stride_x = _sizes(strides[2 * level:2 * level + 2])
        zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
        shifts_x = op.Mul(op.Range(zero, op.Squeeze(width, [0]), one), stride_x)  # [W]
        shifts_y = op.Mul(op.Range(zero, op.Squeeze(height, [0]), one), stride_y)  # [H]
        grid = op.Concat(height, width, axis=0)
        shift_x = op.Reshape(op.Expand(op.Unsqueeze(shifts_x, [0]), grid), [-1])  # row-major: x varies fastest
        shift_y = op.Reshape(op.Expand(op.Unsqueeze(shifts_y, [1]), grid), [-1])
        shifts = op.CastLike(op.Concat(*[op.Unsqueeze(s, [1]) for s in (shift_x, shift_y, shift_x, shift_y)],
                                       axis=1), cell)  # [H * W, 4]
        levels.append(op.Reshape(op.Add(op.Unsqueeze(shifts, [1]), op.Unsqueeze(cell, [0])), [-1, 4]))
    return op.Concat(*levels, axis=0) if len(levels) > 1 else op.Identity(levels[0])


def rpn_proposals(objectness, deltas, anchors, num_anchors_per_level, image_sizes, pre_nms_top_n: int,
                  post_nms_top_n: int, nms_thresh: float, score_thresh: float, min_size: float,
                  weights=RPN_WEIGHTS, bbox_xform_clip: float = BBOX_XFORM_CLIP):
    num_images = len(image_sizes) // 2
    boxes_out, scores_out, counts = [], [], []
    for i in range(num_images):
        logits_i = op.Gather(objectness, op.Constant(value_int=i), axis=0)  # [A]
        deltas_i = op.Gather(deltas, op.Constant(value_int=i), axis=0)  # [A, 4]
        # The best pre_nms_top_n logits of each level (torchvision's _get_top_n_idx), with their level.
        start = op.Constant(value_ints=[0])
        chosen, levels = [], []
        for level, count in enumerate(num_anchors_per_level):
            count = _scalar(count)
            end = op.Add(start, count)
            level_logits = op.Slice(logits_i, start, end, [0])
            k = op.Min(count, _scalar(pre_nms_top_n))
            _, index = op.TopK(level_logits, k, axis=0, largest=1, sorted=1)
            chosen.append(op.Add(index, start))
            levels.append(op.Expand(op.Constant(value_ints=[level]), op.Shape(index)))
            start = end
        index = op.Concat(*chosen, axis=0)
        level = op.Concat(*levels, axis=0)
        boxes = _decode(op.Gather(deltas_i, index, axis=0), op.Gather(anchors, index, axis=0), weights,
                        bbox_xform_clip)
        scores = op.Sigmoid(op.Gather(logits_i, index, axis=0))
        boxes = _clip(boxes, *_sizes(image_sizes[2 * i:2 * i + 2]))
        keep = op.And(_big_enough(boxes, min_size), op.GreaterOrEqual(scores, _float_like(score_thresh, scores)))
        boxes, scores, level = _select(boxes, keep), _select(scores, keep), _select(level, keep)
        kept = _batched_nms_indices(boxes, scores, level, nms_thresh, post_nms_top_n)
        boxes_out.append(op.Gather(boxes, kept, axis=0))
        scores_out.append(op.Gather(scores, kept, axis=0))
        counts.append(_count(kept))
    return (op.Concat(*boxes_out, axis=0), op.Concat(*scores_out, axis=0), op.Concat(*counts, axis=0))


def detection_postprocess(class_logits, box_regression, proposals, boxes_per_image, image_sizes, weights,
                          score_thresh: float, nms_thresh: float, detections_per_img: int, min_size: float = 0.01,
                          bbox_xform_clip: float = BBOX_XFORM_CLIP):
    num_classes = op.Shape(class_logits, start=1, end=2)
    scores_all = op.Softmax(class_logits, axis=-1)  # [K, C]
    # Decode every class's deltas on its proposal: [K * C, 4].
    deltas = op.Reshape(box_regression, [-1, 4])
    repeated = op.Reshape(op.Expand(op.Unsqueeze(proposals, [1]), op.Concat(_count(proposals), num_classes,
                                                                           _ints(4), axis=0)), [-1, 4])
    decoded = op.Reshape(_decode(deltas, repeated, weights, bbox_xform_clip),
                         op.Concat(_count(proposals), num_classes, _ints(4), axis=0))  # [K, C, 4]
    labels_all = op.Expand(op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Squeeze(num_classes, [0]),
                                                 op.Constant(value_int=1)), [0]), op.Shape(scores_all))
    boxes_out, scores_out, labels_out, counts = [], [], [], []
    start = op.Constant(value_ints=[0])
    for i, rows in enumerate(boxes_per_image):
        end = op.Add(start, _scalar(rows))
        # Background (class 0) dropped; then one row per (proposal, class).
        boxes = op.Reshape(op.Slice(op.Slice(decoded, start, end, [0]), [1], [2**62], [1]), [-1, 4])
        scores = op.Reshape(op.Slice(op.Slice(scores_all, start, end, [0]), [1], [2**62], [1]), [-1])
        labels = op.Reshape(op.Slice(op.Slice(labels_all, start, end, [0]), [1], [2**62], [1]), [-1])
        start = end
        boxes = _clip(boxes, *_sizes(image_sizes[2 * i:2 * i + 2]))
        keep = op.And(op.Greater(scores, _float_like(score_thresh, scores)), _big_enough(boxes, min_size))
        boxes, scores, labels = _select(boxes, keep), _select(scores, keep), _select(labels, keep)
        kept = _batched_nms_indices(boxes, scores, labels, nms_thresh, detections_per_img)
        boxes_out.append(op.Gather(boxes, kept, axis=0))
        scores_out.append(op.Gather(scores, kept, axis=0))
        labels_out.append(op.Gather(labels, kept, axis=0))
        counts.append(_count(kept))
    return (op.Concat(*boxes_out, axis=0), op.Concat(*scores_out, axis=0), op.Concat(*labels_out, axis=0),
            op.Concat(*counts, axis=0))


def split_per_image(values, counts):
    num_images = counts.shape[0]
    ends = op.CumSum(counts, op.Constant(value_int=0))  # image i's rows end at ends[i]
    bounds = []
    for i in range(num_images):
        start = op.Constant(value_ints=[0]) if i == 0 else op.Slice(ends, [i - 1], [i], [0])
        bounds.append((start, op.Slice(ends, [i], [i + 1], [0])))
    return [op.Slice(value, start, end, [0]) for value in values for start, end in bounds]


def _rois_split(rois):
    boxes = op.Slice(rois, [1], [5], [1])
    batch_indices = op.Cast(_column(rois, 0), to=_INT64)
    return boxes, batch_indices


def roi_align(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int,
              aligned: bool):
    boxes, batch_indices = _rois_split(rois)
    # sampling_ratio <= 0 is adaptive in both (ONNX spells it 0).
    return op.RoiAlign(input, boxes, batch_indices, spatial_scale=float(spatial_scale),
                       output_height=int(pooled_height), output_width=int(pooled_width),
                       sampling_ratio=max(int(sampling_ratio), 0),
                       coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel")


def multi_scale_roi_align(features, rois, scales, pooled_height: int, pooled_width: int, sampling_ratio: int,
                          aligned: bool, canonical_scale: float = CANONICAL_SCALE,
                          canonical_level: float = CANONICAL_LEVEL):
    if len(features) == 1:
        return roi_align(features[0], rois, scales[0], pooled_height, pooled_width, sampling_ratio, aligned)
    # torchvision's LevelMapper: floor(k0 + log2(sqrt(area) / s0) + eps), clamped to the maps' levels.
    k_min = round(-math.log2(scales[0]))
    k_max = round(-math.log2(scales[-1]))
    boxes, _ = _rois_split(rois)
    area = op.Mul(op.Sub(_column(boxes, 2), _column(boxes, 0)), op.Sub(_column(boxes, 3), _column(boxes, 1)))
    log2 = op.Div(op.Log(op.Div(op.Sqrt(area), _float_like(canonical_scale, area))), _float_like(math.log(2.0), area))
    level = op.Floor(op.Add(op.Add(_float_like(canonical_level, area), log2), _float_like(FPN_LEVEL_EPS, area)))
    level = op.Sub(op.Cast(op.Clip(level, _float_like(k_min, area), _float_like(k_max, area)), to=_INT64),
                   op.Constant(value_int=k_min))
    channels = op.Shape(features[0], start=1, end=2)
    result = op.CastLike(op.ConstantOfShape(op.Concat(_count(rois), channels, _ints(pooled_height, pooled_width),
                                                      axis=0)), features[0])  # zeros: RoIs past the last level
    for index, (feature, scale) in enumerate(zip(features, scales)):
        where = op.NonZero(op.Equal(level, op.Constant(value_int=index)))  # [1, K_l]
        pooled = roi_align(feature, op.Gather(rois, op.Squeeze(where, [0]), axis=0), scale, pooled_height,
                           pooled_width, sampling_ratio, aligned)
        result = op.ScatterND(result, op.Transpose(where, perm=[1, 0]), pooled)
    return result


def roi_pool(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int):
    raise NotImplementedError("fasterrcnn_ext::roi_pool: its argmax (kept for the backward pass) has no ONNX form; "
                              "export under torch.no_grad(), where RoIPool runs without it")


def roi_pool_values(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int):
    return op.MaxRoiPool(input, rois, pooled_shape=[int(pooled_height), int(pooled_width)],
                         spatial_scale=float(spatial_scale))


def nms(dets, scores, iou_threshold: float, max_keep: int = -1):
    return _nms_indices(dets, scores, iou_threshold, max_keep)


def batched_nms(boxes, scores, idxs, iou_threshold: float, max_keep: int = -1):
    return _batched_nms_indices(boxes, scores, idxs, iou_threshold, max_keep)

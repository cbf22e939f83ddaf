// Argument checks shared by the CPU and CUDA kernels (host code only), so both backends reject bad input
// with the same message.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cmath>
#include <c10/util/Exception.h>

namespace fasterrcnn_ext {

// A `[N, 4]` floating-point tensor of (x1, y1, x2, y2) boxes.
inline void check_boxes(const at::Tensor& boxes, const char* op, const char* name) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, op, ": ", name, " must be a [N, 4] tensor, got shape ",
              boxes.sizes());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got dtype ", boxes.scalar_type());
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                             const char* op) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", a_name, " and ", b_name,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                              const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", a_name, " and ", b_name,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

// nms / batched_nms arguments: boxes [N, 4], scores [N] of the same dtype, idxs [N] integers (optional).
inline void check_nms_inputs(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor* idxs,
                             const char* op) {
  check_boxes(boxes, op, "boxes");
  TORCH_CHECK(scores.dim() == 1, op, ": scores must be a [N] tensor, got shape ", scores.sizes());
  TORCH_CHECK(boxes.size(0) == scores.size(0), op, ": boxes and scores must have the same length, got ",
              boxes.size(0), " boxes and ", scores.size(0), " scores");
  check_same_dtype(boxes, "boxes", scores, "scores", op);
  check_same_device(boxes, "boxes", scores, "scores", op);
  if (idxs != nullptr) {
    TORCH_CHECK(idxs->dim() == 1, op, ": idxs must be a [N] tensor, got shape ", idxs->sizes());
    TORCH_CHECK(idxs->size(0) == boxes.size(0), op, ": idxs and boxes must have the same length, got ",
                idxs->size(0), " idxs and ", boxes.size(0), " boxes");
    TORCH_CHECK(at::isIntegralType(idxs->scalar_type(), /*includeBool=*/false), op,
                ": idxs must be an integer tensor, got dtype ", idxs->scalar_type());
    check_same_device(boxes, "boxes", *idxs, "idxs", op);
  }
}

}  // namespace fasterrcnn_ext

namespace fasterrcnn_ext {

// RoI pooling arguments: input [N, C, H, W] floating point, rois [K, 5] of the same dtype and device.
inline void check_roi_inputs(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                             int64_t pooled_height, int64_t pooled_width, const char* op) {
  TORCH_CHECK(input.dim() == 4, op, ": input must be a [N, C, H, W] tensor, got shape ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op, ": input must be a floating-point tensor, got dtype ",
              input.scalar_type());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op,
              ": rois must be a [K, 5] tensor of (batch index, x1, y1, x2, y2), got shape ", rois.sizes());
  check_same_dtype(input, "input", rois, "rois", op);
  check_same_device(input, "input", rois, "rois", op);
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0, op, ": output_size must be positive, got (", pooled_height,
              ", ", pooled_width, ")");
  TORCH_CHECK(spatial_scale > 0, op, ": spatial_scale must be positive, got ", spatial_scale);
}

// multi_scale_roi_align arguments: one scale per level, halving per level (an FPN), same N and C everywhere.
inline void check_multi_scale_inputs(at::TensorList features, const at::Tensor& rois, at::ArrayRef<double> scales,
                                     int64_t pooled_height, int64_t pooled_width) {
  TORCH_CHECK(!features.empty(), "multi_scale_roi_align: features must not be empty");
  TORCH_CHECK(features.size() == scales.size(), "multi_scale_roi_align: got ", features.size(),
              " feature maps but ", scales.size(), " scales");
  for (size_t l = 0; l < features.size(); ++l) {
    check_roi_inputs(features[l], rois, scales[l], pooled_height, pooled_width, "multi_scale_roi_align");
    // Level k of the pyramid is features[k - k_min]: the scales must halve from one level to the next.
    TORCH_CHECK(l == 0 || scales[l] == scales[l - 1] / 2, "multi_scale_roi_align: scales must halve from level to level ",
                "(an FPN), got ", scales);
    const double k = -std::log2(scales[l]);
    TORCH_CHECK(k == std::round(k), "multi_scale_roi_align: scales must be powers of 2, got ", scales);
    TORCH_CHECK(features[l].size(0) == features[0].size(0) && features[l].size(1) == features[0].size(1),
                "multi_scale_roi_align: every feature map must have the batch size and channels of features[0] ",
                features[0].sizes(), ", but features[", l, "] has shape ", features[l].sizes());
  }
}

}  // namespace fasterrcnn_ext

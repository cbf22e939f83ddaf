// Argument checks shared by the CPU and CUDA kernels (host code only), so both backends reject bad input
// with the same message. Defined in checks.cpp, which the C++ compiler builds: the messages are formatted there,
// never in code that nvcc compiles (on a torch 2.11 / gcc 13 machine, formatting an integer into a TORCH_CHECK
// message inside a .cu file crashed the process instead of raising).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cmath>
#include <c10/util/Exception.h>

namespace fasterrcnn_ext {

// A `[N, 4]` floating-point tensor of (x1, y1, x2, y2) boxes.
void check_boxes(const at::Tensor& boxes, const char* op, const char* name);

void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                      const char* op);

void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                       const char* op);

// nms / batched_nms arguments: boxes [N, 4], scores [N] of the same dtype, idxs [N] integers (optional).
void check_nms_inputs(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor* idxs,
                      const char* op);

}  // namespace fasterrcnn_ext

namespace fasterrcnn_ext {

// RoI pooling arguments: input [N, C, H, W] floating point, rois [K, 5] of the same dtype and device.
void check_roi_inputs(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                      int64_t pooled_height, int64_t pooled_width, const char* op);

// multi_scale_roi_align arguments: one scale per level, halving per level (an FPN), same N and C everywhere.
void check_multi_scale_inputs(at::TensorList features, const at::Tensor& rois, at::ArrayRef<double> scales,
                              int64_t pooled_height, int64_t pooled_width);

}  // namespace fasterrcnn_ext

namespace fasterrcnn_ext {

// Box-coder weights (wx, wy, ww, wh).
void check_box_weights(at::ArrayRef<double> weights, const char* op);

// decode_boxes arguments: rel_codes [N, 4 * C], boxes [N, 4], same dtype and device.
void check_decode_inputs(const at::Tensor& rel_codes, const at::Tensor& boxes, at::ArrayRef<double> weights);

void check_encode_inputs(const at::Tensor& reference, const at::Tensor& proposals,
                         at::ArrayRef<double> weights);

void check_clip_inputs(const at::Tensor& boxes, int64_t height, int64_t width);

void check_anchor_inputs(at::TensorList cell_anchors, at::IntArrayRef grid_sizes, at::IntArrayRef strides);

}  // namespace fasterrcnn_ext

namespace fasterrcnn_ext {

void check_rpn_inputs(const at::Tensor& objectness, const at::Tensor& deltas, const at::Tensor& anchors,
                      at::IntArrayRef num_anchors_per_level, at::IntArrayRef image_sizes);

void check_detection_inputs(const at::Tensor& class_logits, const at::Tensor& box_regression,
                            const at::Tensor& proposals, at::IntArrayRef boxes_per_image,
                            at::IntArrayRef image_sizes, at::ArrayRef<double> weights);

}  // namespace fasterrcnn_ext

namespace fasterrcnn_ext {

// The gradient reaching a RoI pooling backward: [K, C, pooled_height, pooled_width].
void check_pool_grad(const at::Tensor& grad, int64_t num_rois, int64_t channels, int64_t pooled_height,
                     int64_t pooled_width, const char* op);

}  // namespace fasterrcnn_ext

namespace fasterrcnn_ext {

// multi_scale_roi_align backward: one (height, width) per level's scale.
void check_level_shapes(at::ArrayRef<double> scales, at::IntArrayRef heights, at::IntArrayRef widths);

// `tensor` is on a CUDA device (for the CUDA kernels of `op`).
void check_cuda(const at::Tensor& tensor, const char* name, const char* op);

// a and b have the same shape.
void check_same_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                      const char* op);

// At most max_levels feature levels (a kernel's fixed-size table).
void check_num_levels(int64_t levels, int64_t max_levels, const char* op);

}  // namespace fasterrcnn_ext

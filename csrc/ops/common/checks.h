// Argument checks shared by the CPU and CUDA kernels (host code only), so both backends reject bad input
// with the same message. Defined in checks.cpp, which the C++ compiler builds, so nvcc-compiled code only calls
// them.
//
// Messages are built by `message()` below with std::string and std::to_string, never with iostreams: a TORCH_CHECK
// that formats an integer through c10::str's ostringstream inside a .cu file can crash the process (in
// std::ostream::_M_insert<long>, with torch 2.11, gcc 13 and nvcc 13.0) instead of raising (docs/performance.md).
// scripts/lint_sources.py holds csrc/ to FRCNN_CHECK.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace fasterrcnn_ext {

namespace detail {

template <typename T>
void append_list(std::string& out, c10::ArrayRef<T> values);

inline void append_double(std::string& out, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);  // what an ostream prints by default
  out += buf;
}

template <typename T>
void append(std::string& out, const T& v) {
  if constexpr (std::is_same_v<T, bool>) {
    out += v ? "true" : "false";
  } else if constexpr (std::is_integral_v<T>) {
    out += std::to_string(v);
  } else if constexpr (std::is_floating_point_v<T>) {
    append_double(out, static_cast<double>(v));
  } else if constexpr (std::is_convertible_v<const T&, const char*>) {
    out += static_cast<const char*>(v);
  } else if constexpr (std::is_same_v<T, std::string>) {
    out += v;
  } else if constexpr (std::is_same_v<T, c10::ScalarType>) {
    out += c10::toString(v);
  } else if constexpr (std::is_same_v<T, c10::Device>) {
    out += v.str();
  } else if constexpr (std::is_convertible_v<const T&, c10::IntArrayRef>) {
    append_list(out, c10::IntArrayRef(v));
  } else if constexpr (std::is_convertible_v<const T&, c10::ArrayRef<double>>) {
    append_list(out, c10::ArrayRef<double>(v));
  } else {
    static_assert(!sizeof(T), "message(): no formatting for this type");
  }
}

template <typename T>
void append_list(std::string& out, c10::ArrayRef<T> values) {  // "[a, b, c]", as c10 prints an ArrayRef
  out += '[';
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) out += ", ";
    append(out, values[i]);
  }
  out += ']';
}

}  // namespace detail

// The concatenation of the arguments as text: strings, numbers, sizes, lists of doubles, dtypes, devices.
template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  (detail::append(out, args), ...);
  return out;
}

}  // namespace fasterrcnn_ext

// TORCH_CHECK with the message built by fasterrcnn_ext::message (only when the check fails).
#define FRCNN_CHECK(cond, ...) TORCH_CHECK(cond, ::fasterrcnn_ext::message(__VA_ARGS__))

namespace fasterrcnn_ext {

// A `[N, 4]` floating-point tensor of (x1, y1, x2, y2) boxes.
// A RoI's batch index (the first column of rois[roi]; NaN included) must be in [0, batch_size).
void check_roi_batch_index(double batch_index, int64_t roi, int64_t batch_size, const char* op);
void check_boxes(const at::Tensor& boxes, const char* op, const char* name);

void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                      const char* op);

void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                       const char* op);

// nms / batched_nms arguments: boxes [N, 4], scores [N] of the same dtype, idxs [N] integers (optional).
void check_nms_inputs(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor* idxs,
                      const char* op);

// _nms_bitmask's chunk_rows: 0 (the memory budget decides) or a positive multiple of block_boxes.
void check_nms_chunk_rows(int64_t chunk_rows, int64_t block_boxes, const char* op);
// detection_postprocess_padded: N * P proposal rows (N = image_sizes / 2), proposal_counts int64 [N] on their device,
// detections_per_img >= 0, and detection_postprocess's checks. Returns P.
int64_t check_detection_padded_inputs(const at::Tensor& class_logits, const at::Tensor& box_regression,
                                      const at::Tensor& proposals, const at::Tensor& proposal_counts,
                                      at::IntArrayRef image_sizes, at::ArrayRef<double> weights,
                                      int64_t detections_per_img);
// The valid flags of a keep mask over only some boxes: bool [N], on the boxes' device.
void check_nms_valid(const at::Tensor& valid, const at::Tensor& boxes, const char* op);

}  // namespace fasterrcnn_ext

namespace fasterrcnn_ext {

// The dtypes RoI pooling takes: rois of input's dtype, or float32 rois with a float16/bfloat16 map (the kernels
// read the map in its dtype and accumulate in float32; box coordinates stay float32, as bfloat16 ones step by 4
// pixels at 1000).
void check_roi_dtypes(const at::Tensor& input, const at::Tensor& rois, const char* op);

// RoI pooling arguments: input [N, C, H, W] floating point, rois [K, 5] of a dtype check_roi_dtypes takes, on the
// same device.
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
                      at::IntArrayRef num_anchors_per_level, at::IntArrayRef image_sizes,
                      at::ArrayRef<double> weights);

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

// _roi_align_per_element: roi_align's checks for one feature map, multi_scale_roi_align's for more; table_bytes >= 0.
void check_roi_align_per_element_inputs(at::TensorList features, const at::Tensor& rois,
                                        at::ArrayRef<double> scales, int64_t pooled_height, int64_t pooled_width,
                                        int64_t table_bytes);

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

// Argument checks shared by the CPU and CUDA kernels (host code only), so both backends reject bad input
// with the same message.
#pragma once

#include <ATen/core/Tensor.h>
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

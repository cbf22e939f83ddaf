// The CPU NMS core, shared by the nms ops and the fused post-processing kernels.
#pragma once

#include <cstdint>
#include <vector>

namespace fasterrcnn_ext {

// Greedy NMS over n boxes ([n, 4] acc_t) with their scores; class-aware when `classes` is not null. Returns the kept
// indices by decreasing score (ties: lower index first; NaN scores last), at most max_keep of them (-1: all).
// Defined for float and double in nms_kernel.cpp.
template <typename acc_t>
std::vector<int64_t> nms_keep(const acc_t* boxes, const acc_t* scores, const int64_t* classes, int64_t n,
                              double iou_threshold, int64_t max_keep);

}  // namespace fasterrcnn_ext

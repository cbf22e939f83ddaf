// Per-element box arithmetic shared by the CPU and CUDA kernels.
//
// Every formula here is written once, so the CPU tests (which run everywhere) also cover the arithmetic of
// the CUDA kernels. The order of operations follows torchvision so float32 results match it bit for bit.
// `acc_t` is the accumulation type: float for float16/bfloat16/float32, double for float64.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "host_device.h"

namespace fasterrcnn_ext {

// `a < b ? b : a` is std::max's definition: same result on NaN as torchvision, and compilers turn it into a
// SIMD max instruction.
template <typename T>
FRCNN_INLINE T max_of(T a, T b) {
  return a < b ? b : a;
}
template <typename T>
FRCNN_INLINE T min_of(T a, T b) {
  return b < a ? b : a;
}

// Area of an (x1, y1, x2, y2) box, not clamped: torchvision's box_area.
template <typename T>
FRCNN_INLINE T box_area(T x1, T y1, T x2, T y2) {
  return (x2 - x1) * (y2 - y1);
}

// Intersection over union of boxes a and b whose areas are already known.
template <typename T>
FRCNN_INLINE T box_iou(T ax1, T ay1, T ax2, T ay2, T area_a, T bx1, T by1, T bx2, T by2, T area_b) {
  const T w = max_of(min_of(ax2, bx2) - max_of(ax1, bx1), T(0));
  const T h = max_of(min_of(ay2, by2) - max_of(ay1, by1), T(0));
  const T inter = w * h;
  return inter / (area_a + area_b - inter);
}

// The largest acc_t that is <= threshold. For any acc_t x, `x > threshold` (compared in double, as torchvision's
// CPU NMS does) is then exactly `x > iou_threshold_as<acc_t>(threshold)`, which keeps the SIMD loop in acc_t.
template <typename acc_t>
inline acc_t iou_threshold_as(double threshold) {
  acc_t t = static_cast<acc_t>(threshold);
  if (static_cast<double>(t) > threshold) {
    t = std::nextafter(t, -std::numeric_limits<acc_t>::infinity());
  }
  return t;
}

}  // namespace fasterrcnn_ext

// Per-element box arithmetic shared by the CPU and CUDA kernels.
//
// Every formula here is written once, so the CPU tests (which run everywhere) also cover the arithmetic of
// the CUDA kernels. The order of operations follows torchvision so float32 results match it bit for bit.
// `acc_t` is the accumulation type: float for float16/bfloat16/float32, double for float64.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
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

namespace fasterrcnn_ext {

// Box regression (Faster R-CNN eq. 2), as torchvision's BoxCoder, in acc_t (float32 at least).
// bbox_xform_clip bounds dw and dh before exp(): log(1000 / 16) keeps a box from growing more than 1000/16 = 62.5x
// the anchor (the largest box an image holds over the smallest stride), and keeps exp() finite.
template <typename T>
struct BoxWeights {
  T wx, wy, ww, wh;
};

// exp() for box decoding, identical on the host and the device: a Cephes-style polynomial (about 1 ulp in float32,
// like torch.exp's vectorised one) written in plain arithmetic, so the CPU loops that call it vectorise and the CPU
// and CUDA kernels give the same bits. NaN stays NaN; large inputs give inf, very negative ones 0.
FRCNN_INLINE float box_exp(float x) {
  // round(x / ln 2) by the 1.5 * 2^23 trick: plain additions, so it vectorises without -fno-trapping-math (which
  // floor() needs) and rounds the same everywhere. Exact for |x / ln 2| < 2^22; larger x are handled below.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;                             // x - n ln 2, in two parts for accuracy
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  // 2^n from the exponent bits; n is clamped first so the conversion is defined (NaN clamps too, y stays NaN).
  const float n_clamped = n > -126.0f ? (n < 127.0f ? n : 127.0f) : -126.0f;
  const int32_t bits = (static_cast<int32_t>(n_clamped) + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  const float result = y * scale;
  return x > 88.72283f ? INFINITY : (x < -87.33654f ? 0.0f : result);
}
FRCNN_INLINE double box_exp(double x) {
  return exp(x);
}

template <typename T>
FRCNN_INLINE void decode_box(T dx, T dy, T dw, T dh, T x1, T y1, T x2, T y2, const BoxWeights<T>& w, T clip,
                             T* out) {
  const T width = x2 - x1, height = y2 - y1;
  const T ctr_x = x1 + T(0.5) * width, ctr_y = y1 + T(0.5) * height;
  dx = dx / w.wx;
  dy = dy / w.wy;
  dw = min_of(dw / w.ww, clip);  // NaN stays NaN, as torch.clamp
  dh = min_of(dh / w.wh, clip);
  const T pred_ctr_x = dx * width + ctr_x, pred_ctr_y = dy * height + ctr_y;
  const T pred_w = box_exp(dw) * width, pred_h = box_exp(dh) * height;
  const T half_w = T(0.5) * pred_w, half_h = T(0.5) * pred_h;
  out[0] = pred_ctr_x - half_w;
  out[1] = pred_ctr_y - half_h;
  out[2] = pred_ctr_x + half_w;
  out[3] = pred_ctr_y + half_h;
}

// The regression targets that take `proposal` to `reference` (the inverse of decode_box).
template <typename T>
FRCNN_INLINE void encode_box(T rx1, T ry1, T rx2, T ry2, T px1, T py1, T px2, T py2, const BoxWeights<T>& w,
                             T* out) {
  const T ex_w = px2 - px1, ex_h = py2 - py1;
  const T ex_ctr_x = px1 + T(0.5) * ex_w, ex_ctr_y = py1 + T(0.5) * ex_h;
  const T gt_w = rx2 - rx1, gt_h = ry2 - ry1;
  const T gt_ctr_x = rx1 + T(0.5) * gt_w, gt_ctr_y = ry1 + T(0.5) * gt_h;
  out[0] = w.wx * (gt_ctr_x - ex_ctr_x) / ex_w;
  out[1] = w.wy * (gt_ctr_y - ex_ctr_y) / ex_h;
  out[2] = w.ww * log(gt_w / ex_w);
  out[3] = w.wh * log(gt_h / ex_h);
}

// torch.clamp(v, 0, limit): NaN stays NaN.
template <typename T>
FRCNN_INLINE T clip_coordinate(T v, T limit) {
  return v < T(0) ? T(0) : (v > limit ? limit : v);
}

// torchvision's remove_small_boxes test: both sides at least min_size (NaN sides fail).
template <typename T>
FRCNN_INLINE bool box_is_large_enough(T x1, T y1, T x2, T y2, T min_size) {
  return (x2 - x1) >= min_size && (y2 - y1) >= min_size;
}

}  // namespace fasterrcnn_ext

// Per-element RoI pooling arithmetic shared by the CPU and CUDA kernels: RoIAlign sampling geometry and bilinear
// weights, RoIPool bins, and the FPN level of a RoI. Written once so the CPU tests cover the CUDA arithmetic too.
// The formulas and their order of operations follow torchvision's kernels.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace fasterrcnn_ext {

// The adaptive sampling grid (sampling_ratio <= 0) is ceil(bin size) samples per bin side. A bin larger than twice
// the feature map gains nothing from more samples, and NaN or enormous RoIs (1e30) would otherwise ask for an
// unbounded number: the grid is capped at this many samples per side.
FRCNN_INLINE int64_t roi_align_max_grid(int64_t height, int64_t width) {
  return 2 * (height > width ? height : width) + 2;
}

template <typename T>
struct RoIAlignGeometry {
  T start_h, start_w;    // top-left of the RoI on the feature map
  T bin_h, bin_w;        // bin size
  int64_t grid_h, grid_w;  // samples per bin side
  T count;               // samples per bin (the divisor of the average)
};

// `box` is (x1, y1, x2, y2) in image coordinates.
template <typename T>
FRCNN_INLINE RoIAlignGeometry<T> roi_align_geometry(T x1, T y1, T x2, T y2, T spatial_scale, int64_t pooled_h,
                                                    int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                                                    int64_t height, int64_t width) {
  RoIAlignGeometry<T> g;
  // aligned: pixel centres sit at half-integer coordinates (the "half-pixel" shift of Detectron2).
  const T offset = aligned ? T(0.5) : T(0);
  g.start_w = x1 * spatial_scale - offset;
  g.start_h = y1 * spatial_scale - offset;
  T roi_w = x2 * spatial_scale - offset - g.start_w;
  T roi_h = y2 * spatial_scale - offset - g.start_h;
  if (!aligned) {  // legacy behaviour: force malformed RoIs to be 1x1
    roi_w = roi_w < T(1) ? T(1) : roi_w;
    roi_h = roi_h < T(1) ? T(1) : roi_h;
  }
  g.bin_h = roi_h / static_cast<T>(pooled_h);
  g.bin_w = roi_w / static_cast<T>(pooled_w);
  const int64_t cap = roi_align_max_grid(height, width);
  if (sampling_ratio > 0) {
    g.grid_h = g.grid_w = sampling_ratio;
  } else {
    // ceil(bin size), capped; `!(x < cap)` also catches NaN and infinity.
    g.grid_h = !(g.bin_h < static_cast<T>(cap)) ? cap : (g.bin_h > T(0) ? static_cast<int64_t>(ceil(g.bin_h)) : 0);
    g.grid_w = !(g.bin_w < static_cast<T>(cap)) ? cap : (g.bin_w > T(0) ? static_cast<int64_t>(ceil(g.bin_w)) : 0);
  }
  const int64_t n = g.grid_h * g.grid_w;
  g.count = static_cast<T>(n > 1 ? n : 1);
  return g;
}

// Coordinate of sample i (of `grid`) in bin `bin` along one axis.
template <typename T>
FRCNN_INLINE T roi_align_sample(T start, int64_t bin, T bin_size, int64_t i, int64_t grid) {
  return start + static_cast<T>(bin) * bin_size + static_cast<T>(i + .5f) * bin_size / static_cast<T>(grid);
}

// Linear interpolation along one axis of length `size`: the two neighbours and their weights. Bilinear weights are
// the products of the two axes' weights. Returns false when the sample lies outside [-1, size] (or is NaN): such
// a sample contributes zero, on either axis.
template <typename T>
struct AxisWeights {
  int64_t low, high;
  T w_low, w_high;
};

template <typename T>
FRCNN_INLINE bool interpolation_weights(T v, int64_t size, AxisWeights<T>& out) {
  if (!(v >= T(-1) && v <= static_cast<T>(size)) || size <= 0) return false;
  if (v <= T(0)) v = T(0);
  out.low = static_cast<int64_t>(v);
  if (out.low >= size - 1) {
    out.high = out.low = size - 1;
    v = static_cast<T>(out.low);
  } else {
    out.high = out.low + 1;
  }
  const T l = v - static_cast<T>(out.low);
  out.w_high = l;
  out.w_low = T(1) - l;
  return true;
}

// The valid samples of bin `bin` along one axis of a RoI (`start`, `bin_size` and `grid` from its geometry), in
// sample order, written to out[0, n); returns n <= grid. A sample outside the map contributes nothing on either
// axis, so the kernels leave it out here, once for every channel, instead of testing it per channel.
template <typename T>
FRCNN_INLINE int64_t roi_align_bin_samples(T start, int64_t bin, T bin_size, int64_t grid, int64_t size,
                                           AxisWeights<T>* out) {
  int64_t n = 0;
  for (int64_t i = 0; i < grid; ++i) {
    if (interpolation_weights(roi_align_sample(start, bin, bin_size, i, grid), size, out[n])) ++n;
  }
  return n;
}

// RoIPool's bin [start, end) along one axis, clipped to [0, size). `roi_start` and `roi_len` are the rounded RoI
// start and length on the feature map.
template <typename T>
FRCNN_INLINE void roi_pool_bin(int64_t bin, T bin_size, int64_t roi_start, int64_t size, int64_t& start,
                               int64_t& end) {
  start = static_cast<int64_t>(floor(static_cast<T>(bin) * bin_size)) + roi_start;
  end = static_cast<int64_t>(ceil(static_cast<T>(bin + 1) * bin_size)) + roi_start;
  start = start < 0 ? 0 : (start > size ? size : start);
  end = end < 0 ? 0 : (end > size ? size : end);
}

// round(v) as int64 for a RoIPool coordinate; values beyond +-2^40 (far outside any feature map) are clamped so the
// conversion is defined. NaN is reported through `ok`.
template <typename T>
FRCNN_INLINE int64_t roi_pool_round(T v, bool& ok) {
  if (!(v == v)) {
    ok = false;
    return 0;
  }
  const T limit = static_cast<T>(1099511627776.0);  // 2^40
  v = v < -limit ? -limit : (v > limit ? limit : v);
  return static_cast<int64_t>(round(v));
}

// The FPN level of a RoI (Feature Pyramid Networks, eq. 1): floor(k0 + log2(sqrt(area) / s0) + eps), clamped to
// [k_min, k_max]; returned relative to k_min. eps keeps areas exactly at a level boundary on the upper level despite
// log2 rounding. NaN areas go to the lowest level.
template <typename T>
FRCNN_INLINE int64_t fpn_level(T x1, T y1, T x2, T y2, T canonical_scale, T canonical_level, int64_t k_min,
                               int64_t k_max, T eps) {
  const T s = sqrt((x2 - x1) * (y2 - y1));
  const T level = floor(canonical_level + log2(s / canonical_scale) + eps);
  if (!(level > static_cast<T>(k_min))) return 0;  // also NaN
  if (level >= static_cast<T>(k_max)) return k_max - k_min;
  return static_cast<int64_t>(level) - k_min;
}

}  // namespace fasterrcnn_ext

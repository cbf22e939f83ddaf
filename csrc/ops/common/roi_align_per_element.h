// The steps of the CUDA RoIAlign forward (cuda/roi_align_kernel.cu), written once for the device and for its CPU
// twin, the private op `_roi_align_per_element` (cpu/roi_align_per_element_kernel.cpp), which runs them serially so
// the CPU tests cover them. The CPU's own fast kernel (cpu/roi_align_kernel.cpp) pools channel blocks instead.
//
// One CUDA block pools one RoI (or a chunk of its channels):
//   1. one thread reads the RoI: its image, FPN level and sampling geometry (roi_align_task);
//   2. the block's threads fill the RoI's sample table, one bin per thread (roi_align_table_fill): for each row bin
//      and each column bin, its valid samples with their interpolation weights;
//   3. each thread pools output elements (channel, bin) from the table (roi_align_table_bin).
// The table replaces, for every output element, the RoI read, the level's log2, the geometry's divisions and the
// interpolation weights of every sample: one block's threads share them. A RoI whose table does not fit the
// block's shared memory (an adaptive sampling grid of huge bins) is pooled per element (roi_align_direct_bin).
// Both ways sum the same products in the same order, so they give the same bits.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "checks.h"
#include "constants.h"
#include "host_device.h"
#include "roi_math.h"

namespace fasterrcnn_ext {

constexpr int kRoIAlignMaxLevels = 8;

// The feature pyramid as the kernels see it (one level for roi_align), passed by value. T is the element type of
// the planes (const for the forward).
template <typename T>
struct RoIAlignLevels {
  T* data[kRoIAlignMaxLevels];  // [N, C, height, width] contiguous
  int64_t height[kRoIAlignMaxLevels], width[kRoIAlignMaxLevels];
  double scale[kRoIAlignMaxLevels];
  int num;
  int64_t k_min, k_max;  // FPN levels of the finest and coarsest map
};

// Host: the pyramid's description from its levels' planes, sizes and scales (at most kRoIAlignMaxLevels).
template <typename T>
inline RoIAlignLevels<T> make_roi_align_levels(const std::vector<T*>& data, at::IntArrayRef heights,
                                               at::IntArrayRef widths, at::ArrayRef<double> scales, const char* op) {
  check_num_levels(static_cast<int64_t>(data.size()), kRoIAlignMaxLevels, op);
  RoIAlignLevels<T> lv{};
  lv.num = static_cast<int>(data.size());
  for (int l = 0; l < lv.num; ++l) {
    lv.data[l] = data[l];
    lv.height[l] = heights[l];
    lv.width[l] = widths[l];
    lv.scale[l] = scales[l];
  }
  lv.k_min = static_cast<int64_t>(-std::log2(scales.front()));
  lv.k_max = static_cast<int64_t>(-std::log2(scales.back()));
  return lv;
}

struct RoIAlignParams {
  int64_t pooled_h, pooled_w, sampling_ratio, batch, channels, num_rois;
  bool aligned;
  float canonical_scale, canonical_level;
};

// The parameters of a one-level RoIAlign (roi_align itself), whose FPN level rule is never used.
inline RoIAlignParams one_level_roi_align_params(int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,
                                                 int64_t batch, int64_t channels, bool aligned) {
  RoIAlignParams pp{};
  pp.pooled_h = pooled_h;
  pp.pooled_w = pooled_w;
  pp.sampling_ratio = sampling_ratio;
  pp.batch = batch;
  pp.channels = channels;
  pp.aligned = aligned;
  pp.canonical_scale = static_cast<float>(kCanonicalScale);
  pp.canonical_level = static_cast<float>(kCanonicalLevel);
  return pp;
}

// Where and how one RoI is pooled.
template <typename T>
struct RoIAlignTask {
  bool valid;  // its batch index is in [0, N); the kernels assert, naming their op
  int level;
  int64_t image;
  RoIAlignGeometry<T> g;
};

// roi: (batch index, x1, y1, x2, y2) already in T.
template <typename T, typename P>
FRCNN_INLINE RoIAlignTask<T> roi_align_task(const RoIAlignLevels<P>& lv, const RoIAlignParams& pp, const T* roi) {
  RoIAlignTask<T> t{};
  t.valid = roi[0] >= T(0) && roi[0] < static_cast<T>(pp.batch);
  if (!t.valid) return t;
  t.image = static_cast<int64_t>(roi[0]);
  // float32, as torchvision's LevelMapper computes it on float32 boxes.
  t.level = lv.num == 1 ? 0
                        : static_cast<int>(fpn_level<float>(static_cast<float>(roi[1]), static_cast<float>(roi[2]),
                                                            static_cast<float>(roi[3]), static_cast<float>(roi[4]),
                                                            pp.canonical_scale, pp.canonical_level, lv.k_min,
                                                            lv.k_max, kFpnLevelEps));
  t.g = roi_align_geometry(roi[1], roi[2], roi[3], roi[4], static_cast<T>(lv.scale[t.level]), pp.pooled_h,
                           pp.pooled_w, pp.sampling_ratio, pp.aligned, lv.height[t.level], lv.width[t.level]);
  return t;
}

// One RoI's sample table: bin p of the rows uses ys[p * grid_h, p * grid_h + y_count[p]), bin q of the columns
// xs[q * grid_w, q * grid_w + x_count[q]). A view over roi_align_table_bytes() caller bytes, 8-byte aligned.
template <typename T>
struct RoIAlignTable {
  AxisWeights<T>* ys;
  AxisWeights<T>* xs;
  int32_t* y_count;
  int32_t* x_count;
  int64_t grid_h, grid_w;
};

// Bytes of the table of a RoI with this geometry; may exceed any buffer for huge adaptive grids (then the RoI is
// pooled per element).
template <typename T>
FRCNN_INLINE int64_t roi_align_table_bytes(const RoIAlignGeometry<T>& g, int64_t pooled_h, int64_t pooled_w) {
  return static_cast<int64_t>(sizeof(AxisWeights<T>)) * (pooled_h * g.grid_h + pooled_w * g.grid_w) +
         static_cast<int64_t>(sizeof(int32_t)) * (pooled_h + pooled_w);
}

template <typename T>
FRCNN_INLINE RoIAlignTable<T> roi_align_table_view(void* bytes, const RoIAlignGeometry<T>& g, int64_t pooled_h,
                                                   int64_t pooled_w) {
  RoIAlignTable<T> t;
  t.ys = static_cast<AxisWeights<T>*>(bytes);
  t.xs = t.ys + pooled_h * g.grid_h;
  t.y_count = reinterpret_cast<int32_t*>(t.xs + pooled_w * g.grid_w);
  t.x_count = t.y_count + pooled_h;
  t.grid_h = g.grid_h;
  t.grid_w = g.grid_w;
  return t;
}

// Fills entry i of the table: row bin i for i < pooled_h, else column bin i - pooled_h. Entries are independent.
template <typename T>
FRCNN_INLINE void roi_align_table_fill(const RoIAlignTable<T>& t, const RoIAlignGeometry<T>& g, int64_t i,
                                       int64_t pooled_h, int64_t height, int64_t width) {
  if (i < pooled_h) {
    t.y_count[i] =
        static_cast<int32_t>(roi_align_bin_samples(g.start_h, i, g.bin_h, t.grid_h, height, t.ys + i * t.grid_h));
  } else {
    const int64_t q = i - pooled_h;
    t.x_count[q] =
        static_cast<int32_t>(roi_align_bin_samples(g.start_w, q, g.bin_w, t.grid_w, width, t.xs + q * t.grid_w));
  }
}

// The bilinear tap of one sample: the same products in the same order on both ways below.
template <typename T, typename scalar_t>
FRCNN_INLINE T roi_align_tap(const scalar_t* plane, int64_t width, const AxisWeights<T>& y, const AxisWeights<T>& x) {
  const scalar_t* row_low = plane + y.low * width;
  const scalar_t* row_high = plane + y.high * width;
  return y.w_low * x.w_low * static_cast<T>(row_low[x.low]) + y.w_low * x.w_high * static_cast<T>(row_low[x.high]) +
         y.w_high * x.w_low * static_cast<T>(row_high[x.low]) + y.w_high * x.w_high * static_cast<T>(row_high[x.high]);
}

// Output element (p, q) of one channel plane ([height][width]) from the table: the average of the bin's samples.
template <typename T, typename scalar_t>
FRCNN_INLINE T roi_align_table_bin(const RoIAlignTable<T>& t, const RoIAlignGeometry<T>& g, const scalar_t* plane,
                                   int64_t width, int64_t p, int64_t q) {
  const AxisWeights<T>* ys = t.ys + p * t.grid_h;
  const AxisWeights<T>* xs = t.xs + q * t.grid_w;
  const int32_t ny = t.y_count[p], nx = t.x_count[q];
  T sum = 0;
  for (int32_t i = 0; i < ny; ++i) {
    const AxisWeights<T> y = ys[i];
    for (int32_t j = 0; j < nx; ++j) sum += roi_align_tap(plane, width, y, xs[j]);
  }
  return sum / g.count;
}

// Calls visit(y, x) with the interpolation weights of every valid sample of bin (p, q), in sample order, each
// computed on the spot (no table): the per-element forward and the CUDA backward.
template <typename T, typename Visit>
FRCNN_INLINE void roi_align_visit_samples(const RoIAlignGeometry<T>& g, int64_t height, int64_t width, int64_t p,
                                          int64_t q, Visit&& visit) {
  for (int64_t iy = 0; iy < g.grid_h; ++iy) {
    AxisWeights<T> y;
    if (!interpolation_weights(roi_align_sample(g.start_h, p, g.bin_h, iy, g.grid_h), height, y)) continue;
    for (int64_t ix = 0; ix < g.grid_w; ++ix) {
      AxisWeights<T> x;
      if (!interpolation_weights(roi_align_sample(g.start_w, q, g.bin_w, ix, g.grid_w), width, x)) continue;
      visit(y, x);
    }
  }
}

// The backward of output element (p, q) of one channel plane: add(offset, term) for the four taps of every valid
// sample, in sample order, term = the tap's weight * grad / count (the plane's offset y * width + x). The CUDA
// backward (float or fixed-point atomics) and the fixed-point CPU twin.
template <typename T, typename Add>
FRCNN_INLINE void roi_align_scatter_bin(const RoIAlignGeometry<T>& g, int64_t height, int64_t width, int64_t p,
                                        int64_t q, T grad, Add&& add) {
  const T gbin = grad / g.count;
  roi_align_visit_samples(g, height, width, p, q, [&](const AxisWeights<T>& y, const AxisWeights<T>& x) {
    add(y.low * width + x.low, y.w_low * x.w_low * gbin);
    add(y.low * width + x.high, y.w_low * x.w_high * gbin);
    add(y.high * width + x.low, y.w_high * x.w_low * gbin);
    add(y.high * width + x.high, y.w_high * x.w_high * gbin);
  });
}

// The same element as roi_align_table_bin, without a table.
template <typename T, typename scalar_t>
FRCNN_INLINE T roi_align_direct_bin(const RoIAlignGeometry<T>& g, const scalar_t* plane, int64_t height,
                                    int64_t width, int64_t p, int64_t q) {
  T sum = 0;
  roi_align_visit_samples(g, height, width, p, q, [&](const AxisWeights<T>& y, const AxisWeights<T>& x) {
    sum += roi_align_tap(plane, width, y, x);
  });
  return sum / g.count;
}

}  // namespace fasterrcnn_ext

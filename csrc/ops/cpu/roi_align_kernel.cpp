// CPU kernels of roi_align and multi_scale_roi_align, forward and backward.
//
// torchvision loops over RoIs serially, one channel at a time, recomputing the bilinear weights for every channel.
// Here (see roi_block.h) each task takes one image and one block of 16 channels (8 for float64), copies it into a
// cache-resident channel-interleaved buffer, and pools every RoI of that image from it: the sample positions and
// weights are computed once per RoI and axis, and each bilinear tap is one vector FMA over the block. Tasks run in
// parallel; the backward scatters into the task's own buffer (no races, RoI order: deterministic) and writes it
// back to the NCHW gradient. roi_align is the one-level case of the multi-level kernel.
// float16/bfloat16 maps are read in their dtype (with RoIs of that dtype or float32, read in float32), pooled in
// float32 and written in their dtype: no float32 copy of the map.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "ops/common/checks.h"
#include "ops/common/constants.h"
#include "ops/common/roi_math.h"
#include "ops/cpu/large_output.h"
#include "ops/cpu/roi_block.h"

namespace fasterrcnn_ext {
namespace {

// The valid samples of one RoI, per axis and per bin: bin p of the rows uses ys[y_begin[p] .. y_begin[p + 1]).
// A sample outside the map on either axis contributes nothing, so it is left out here once for all channels.
template <typename acc_t>
struct RoISamples {
  std::vector<AxisWeights<acc_t>> ys, xs;
  std::vector<int64_t> y_begin, x_begin;
  acc_t count = 1;
  int64_t rows_end = 0;  // the rows the taps read are all below this one

  static void build_axis(acc_t start, acc_t bin_size, int64_t grid, int64_t pooled, int64_t size,
                         std::vector<AxisWeights<acc_t>>& out, std::vector<int64_t>& begin) {
    out.clear();
    begin.resize(pooled + 1);
    begin[0] = 0;
    for (int64_t p = 0; p < pooled; ++p) {
      out.resize(begin[p] + grid);  // room for every sample; kept: the valid ones
      begin[p + 1] = begin[p] + roi_align_bin_samples(start, p, bin_size, grid, size, out.data() + begin[p]);
    }
    out.resize(begin[pooled]);
  }

  void build(const acc_t* roi, acc_t scale, int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,
             bool aligned, int64_t height, int64_t width) {
    const RoIAlignGeometry<acc_t> g = roi_align_geometry(roi[1], roi[2], roi[3], roi[4], scale, pooled_h, pooled_w,
                                                         sampling_ratio, aligned, height, width);
    build_axis(g.start_h, g.bin_h, g.grid_h, pooled_h, height, ys, y_begin);
    build_axis(g.start_w, g.bin_w, g.grid_w, pooled_w, width, xs, x_begin);
    count = g.count;
    rows_end = 0;
    for (const AxisWeights<acc_t>& y : ys) rows_end = std::max(rows_end, y.high + 1);
  }
};

// out[bin][c] = average over the bin's samples of the bilinear interpolation of buf ([H][W][kBlock]).
template <typename acc_t>
__attribute__((always_inline)) inline void pool_roi_impl(const acc_t* __restrict__ buf, int64_t width,
                                                         const RoISamples<acc_t>& s, int64_t ph, int64_t pw,
                                                         acc_t* __restrict__ out) {
  using V = typename VecTypes<acc_t>::V;
  constexpr int64_t B = kBlock<acc_t>, L = kVecBytes / static_cast<int64_t>(sizeof(acc_t));
  constexpr int kVectors = static_cast<int>(B / L);
  for (int64_t p = 0; p < ph; ++p) {
    for (int64_t q = 0; q < pw; ++q) {
      V acc[kVectors] = {};  // the block's channels, kept in registers across the bin's samples
      for (int64_t yi = s.y_begin[p]; yi < s.y_begin[p + 1]; ++yi) {
        const AxisWeights<acc_t>& y = s.ys[yi];
        const acc_t* row_low = buf + y.low * width * B;
        const acc_t* row_high = buf + y.high * width * B;
        for (int64_t xi = s.x_begin[q]; xi < s.x_begin[q + 1]; ++xi) {
          const AxisWeights<acc_t>& x = s.xs[xi];
          const acc_t w1 = y.w_low * x.w_low, w2 = y.w_low * x.w_high, w3 = y.w_high * x.w_low,
                      w4 = y.w_high * x.w_high;
          const acc_t *p1 = row_low + x.low * B, *p2 = row_low + x.high * B, *p3 = row_high + x.low * B,
                      *p4 = row_high + x.high * B;
          for (int j = 0; j < kVectors; ++j) {
            V v1, v2, v3, v4;
            std::memcpy(&v1, p1 + j * L, sizeof(V));
            std::memcpy(&v2, p2 + j * L, sizeof(V));
            std::memcpy(&v3, p3 + j * L, sizeof(V));
            std::memcpy(&v4, p4 + j * L, sizeof(V));
            acc[j] += w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4;
          }
        }
      }
      for (int j = 0; j < kVectors; ++j) {
        const V o = acc[j] / s.count;
        std::memcpy(out + (p * pw + q) * B + j * L, &o, sizeof(V));
      }
    }
  }
}

// t[0 .. kBlock) += w * g, with roi_block.h's vector types: GCC left the plain loops scalar in every clone (perf
// annotate: one vmovss store per channel).
template <typename acc_t>
__attribute__((always_inline)) inline void add_scaled_block(acc_t* t, acc_t w, const acc_t* g) {
  using V = typename VecTypes<acc_t>::V;
  constexpr int64_t L = kVecBytes / static_cast<int64_t>(sizeof(acc_t));
  for (int64_t c = 0; c < kBlock<acc_t>; c += L) {
    V tv, gv;
    std::memcpy(&tv, t + c, sizeof(V));
    std::memcpy(&gv, g + c, sizeof(V));
    tv += w * gv;
    std::memcpy(t + c, &tv, sizeof(V));
  }
}

// The transpose of pool_roi: buf += each bin's gradient (grad[bin][c] / count) spread over its samples' taps.
template <typename acc_t>
__attribute__((always_inline)) inline void unpool_roi_impl(acc_t* buf, int64_t width, const RoISamples<acc_t>& s,
                                                           int64_t ph, int64_t pw, const acc_t* __restrict__ grad) {
  constexpr int64_t B = kBlock<acc_t>;
  for (int64_t p = 0; p < ph; ++p) {
    for (int64_t q = 0; q < pw; ++q) {
      alignas(64) acc_t g[B];
      for (int64_t c = 0; c < B; ++c) g[c] = grad[(p * pw + q) * B + c] / s.count;
      for (int64_t yi = s.y_begin[p]; yi < s.y_begin[p + 1]; ++yi) {
        const AxisWeights<acc_t>& y = s.ys[yi];
        acc_t* row_low = buf + y.low * width * B;
        acc_t* row_high = buf + y.high * width * B;
        for (int64_t xi = s.x_begin[q]; xi < s.x_begin[q + 1]; ++xi) {
          const AxisWeights<acc_t>& x = s.xs[xi];
          // The four taps may be the same pixel (clamped at the border): four separate updates.
          add_scaled_block(row_low + x.low * B, y.w_low * x.w_low, g);
          add_scaled_block(row_low + x.high * B, y.w_low * x.w_high, g);
          add_scaled_block(row_high + x.low * B, y.w_high * x.w_low, g);
          add_scaled_block(row_high + x.high * B, y.w_high * x.w_high, g);
        }
      }
    }
  }
}

FRCNN_CPU_MULTIVERSION void pool_roi(const float* buf, int64_t width, const RoISamples<float>& s, int64_t ph,
                                     int64_t pw, float* out) {
  pool_roi_impl(buf, width, s, ph, pw, out);
}
FRCNN_CPU_MULTIVERSION void pool_roi(const double* buf, int64_t width, const RoISamples<double>& s, int64_t ph,
                                     int64_t pw, double* out) {
  pool_roi_impl(buf, width, s, ph, pw, out);
}
FRCNN_CPU_MULTIVERSION void unpool_roi(float* buf, int64_t width, const RoISamples<float>& s, int64_t ph,
                                       int64_t pw, const float* grad) {
  unpool_roi_impl(buf, width, s, ph, pw, grad);
}
FRCNN_CPU_MULTIVERSION void unpool_roi(double* buf, int64_t width, const RoISamples<double>& s, int64_t ph,
                                       int64_t pw, const double* grad) {
  unpool_roi_impl(buf, width, s, ph, pw, grad);
}

struct PoolParams {
  int64_t pooled_h, pooled_w, sampling_ratio;
  bool aligned;
};

// One feature level: sizes and spatial scale.
struct LevelShape {
  int64_t height, width;
  double scale;
};

// RoIs as acc_t [K, 5], their batch indices (checked against batch_size) and levels.
template <typename acc_t>
struct RoIList {
  std::vector<acc_t> data;
  std::vector<int64_t> batch, level;
  int64_t size() const { return static_cast<int64_t>(batch.size()); }
  const acc_t* roi(int64_t r) const { return data.data() + 5 * r; }
};

// The RoIs are read in acc_t whatever their dtype (float32 RoIs with a float16/bfloat16 map: as they are).
template <typename acc_t>
RoIList<acc_t> read_rois(const at::Tensor& rois_in, int64_t batch_size, const std::vector<LevelShape>& levels,
                         double canonical_scale, double canonical_level, const char* op) {
  const at::Tensor rois = rois_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* p = rois.data_ptr<acc_t>();
  RoIList<acc_t> list;
  const int64_t k = rois.size(0);
  list.data.assign(p, p + 5 * k);
  list.batch.resize(k);
  list.level.assign(k, 0);
  for (int64_t r = 0; r < k; ++r) {
    const acc_t b = list.data[5 * r];
    check_roi_batch_index(b, r, batch_size, op);
    list.batch[r] = static_cast<int64_t>(b);
  }
  if (levels.size() > 1) {
    // The levels of an FPN: k_min and k_max from the finest and coarsest scales (powers of 2, checked).
    const int64_t k_min = static_cast<int64_t>(-std::log2(levels.front().scale));
    const int64_t k_max = static_cast<int64_t>(-std::log2(levels.back().scale));
    for (int64_t r = 0; r < k; ++r) {
      const acc_t* roi = list.roi(r);
      // float32, as torchvision's LevelMapper computes it on float32 boxes.
      list.level[r] = fpn_level<float>(roi[1], roi[2], roi[3], roi[4], static_cast<float>(canonical_scale),
                                       static_cast<float>(canonical_level), k_min, k_max, kFpnLevelEps);
    }
  }
  return list;
}

// The RoIs of each image, ordered by level and then top edge: consecutive RoIs then read overlapping rows of the
// block buffer, which stay in L1/L2 instead of coming from L3. Ties keep RoI order, so the order (and the backward's
// summation order) is fixed.
template <typename acc_t>
RoIsByImage rois_in_scan_order(const RoIList<acc_t>& list, int64_t batch) {
  RoIsByImage by_image(list.batch, batch);
  by_image.sort_each_image([&](int64_t a, int64_t b) {
    if (list.level[a] != list.level[b]) return list.level[a] < list.level[b];
    return top_edge_key(list.roi(a)[2]) < top_edge_key(list.roi(b)[2]);
  });
  return by_image;
}

// Offsets of each level inside one task's buffer.
std::vector<int64_t> level_offsets(const std::vector<LevelShape>& levels, int64_t block) {
  std::vector<int64_t> off{0};
  for (const LevelShape& l : levels) off.push_back(off.back() + l.height * l.width * block);
  return off;
}

// Every RoI's samples, built once (in parallel) and shared by all channel-block tasks.
template <typename acc_t>
std::vector<RoISamples<acc_t>> build_samples(const RoIList<acc_t>& list, const std::vector<LevelShape>& levels,
                                             const PoolParams& pp) {
  std::vector<RoISamples<acc_t>> samples(list.size());
  at::parallel_for(0, list.size(), 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const LevelShape& lv = levels[list.level[r]];
      samples[r].build(list.roi(r), static_cast<acc_t>(lv.scale), pp.pooled_h, pp.pooled_w, pp.sampling_ratio,
                       pp.aligned, lv.height, lv.width);
    }
  });
  return samples;
}

template <typename scalar_t>
at::Tensor roi_align_forward_cpu_typed(const std::vector<at::Tensor>& features, const std::vector<LevelShape>& levels,
                                       const at::Tensor& rois, const PoolParams& pp, double canonical_scale,
                                       double canonical_level, const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t B = kBlock<acc_t>;
  const int64_t batch = features[0].size(0), channels = features[0].size(1);
  const RoIList<acc_t> list = read_rois<acc_t>(rois, batch, levels, canonical_scale, canonical_level, op);
  const int64_t k = list.size(), ph = pp.pooled_h, pw = pp.pooled_w, bins = ph * pw;
  at::Tensor output = empty_large({k, channels, ph, pw}, features[0].options());
  if (k == 0 || channels == 0) return output;
  const RoIsByImage by_image = rois_in_scan_order(list, batch);
  const std::vector<int64_t> offsets = level_offsets(levels, B);
  const int64_t blocks = (channels + B - 1) / B;
  scalar_t* out = output.data_ptr<scalar_t>();
  const std::vector<RoISamples<acc_t>> samples = build_samples(list, levels, pp);

  at::parallel_for(0, batch * blocks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> buf(offsets.back());
    std::vector<acc_t> roi_out(bins * B);
    std::vector<scalar_t> staged(bins * B);  // roi_out as the output's [channel][bin]
    std::vector<int64_t> rows_ready(levels.size());
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * B, nc = std::min(B, channels - c0);
      std::fill(rows_ready.begin(), rows_ready.end(), 0);
      for (int64_t i = by_image.begin[n]; i < by_image.begin[n + 1]; ++i) {
        const int64_t r = by_image.ids[i], l = list.level[r];
        // The block's rows are gathered as the RoIs (in top-edge order) first need them: rows no RoI of the image
        // reads, and levels none uses, are never gathered.
        if (samples[r].rows_end > rows_ready[l]) {
          gather_channel_block<scalar_t, acc_t>(features[l], n, c0, rows_ready[l], samples[r].rows_end,
                                                buf.data() + offsets[l]);
          rows_ready[l] = samples[r].rows_end;
        }
        pool_roi(buf.data() + offsets[l], levels[l].width, samples[r], ph, pw, roi_out.data());
        // Staged as the output's [channel][bin] in L1, then streamed out: the RoI's block of the output is one
        // contiguous run of whole cache lines (bins * 64 bytes) wherever the output is 64-byte aligned.
        store_block_rows(roi_out.data(), bins, nc, staged.data(), bins);
        stream_store(staged.data(), nc * bins * sizeof(scalar_t), out + (r * channels + c0) * bins);
      }
    }
    stream_fence();
  });
  return output;
}

template <typename scalar_t>
std::vector<at::Tensor> roi_align_backward_cpu_typed(const at::Tensor& grad_in, const std::vector<LevelShape>& levels,
                                                     const at::Tensor& rois, const PoolParams& pp, int64_t batch,
                                                     int64_t channels, double canonical_scale,
                                                     double canonical_level, const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t B = kBlock<acc_t>;
  const RoIList<acc_t> list = read_rois<acc_t>(rois, batch, levels, canonical_scale, canonical_level, op);
  const int64_t k = list.size(), ph = pp.pooled_h, pw = pp.pooled_w, bins = ph * pw;
  std::vector<at::Tensor> grads;
  if (k == 0 || channels == 0) {
    for (const LevelShape& lv : levels) grads.push_back(at::zeros({batch, channels, lv.height, lv.width}, grad_in.options()));
    return grads;
  }
  // Every task writes its whole block back (zeros where no RoI reaches), so no zero-fill is needed first.
  for (const LevelShape& lv : levels) grads.push_back(empty_large({batch, channels, lv.height, lv.width}, grad_in.options()));
  const at::Tensor grad_t = grad_in.contiguous();
  const scalar_t* grad = grad_t.data_ptr<scalar_t>();
  const RoIsByImage by_image = rois_in_scan_order(list, batch);
  const std::vector<int64_t> offsets = level_offsets(levels, B);
  const int64_t blocks = (channels + B - 1) / B;
  const std::vector<RoISamples<acc_t>> samples = build_samples(list, levels, pp);

  at::parallel_for(0, batch * blocks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> buf(offsets.back());
    std::vector<acc_t> roi_grad(bins * B, acc_t(0));
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * B, nc = std::min(B, channels - c0);
      std::fill(buf.begin(), buf.end(), acc_t(0));
      for (int64_t i = by_image.begin[n]; i < by_image.begin[n + 1]; ++i) {
        const int64_t r = by_image.ids[i], l = list.level[r];
        load_block_rows(grad + (r * channels + c0) * bins, bins, nc, bins, roi_grad.data());
        unpool_roi(buf.data() + offsets[l], levels[l].width, samples[r], ph, pw, roi_grad.data());
      }
      for (size_t l = 0; l < levels.size(); ++l) {
        scatter_channel_block<scalar_t, acc_t>(buf.data() + offsets[l], n, c0, grads[l]);
      }
    }
    stream_fence();
  });
  return grads;
}

at::Tensor roi_align_forward_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                 int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  check_roi_inputs(input, rois, spatial_scale, pooled_height, pooled_width, "roi_align");
  const std::vector<LevelShape> levels{{input.size(2), input.size(3), spatial_scale}};
  const PoolParams pp{pooled_height, pooled_width, sampling_ratio, aligned};
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_forward_cpu", [&] {
    out = roi_align_forward_cpu_typed<scalar_t>({input}, levels, rois, pp, 0, 0, "roi_align");
  });
  return out;
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width, int64_t sampling_ratio, bool aligned) {
  check_pool_grad(grad, rois.size(0), channels, pooled_height, pooled_width, "roi_align backward");
  const std::vector<LevelShape> levels{{height, width, spatial_scale}};
  const PoolParams pp{pooled_height, pooled_width, sampling_ratio, aligned};
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cpu", [&] {
    out = roi_align_backward_cpu_typed<scalar_t>(grad, levels, rois, pp, batch_size, channels, 0, 0,
                                                 "roi_align backward")[0];
  });
  return out;
}

at::Tensor multi_scale_roi_align_cpu(at::TensorList features, const at::Tensor& rois, at::ArrayRef<double> scales,
                                     int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                     bool aligned, double canonical_scale, double canonical_level) {
  check_multi_scale_inputs(features, rois, scales, pooled_height, pooled_width);
  std::vector<LevelShape> levels;
  for (size_t l = 0; l < features.size(); ++l) levels.push_back({features[l].size(2), features[l].size(3), scales[l]});
  const PoolParams pp{pooled_height, pooled_width, sampling_ratio, aligned};
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "multi_scale_roi_align_cpu", [&] {
    out = roi_align_forward_cpu_typed<scalar_t>(features.vec(), levels, rois, pp, canonical_scale, canonical_level,
                                                "multi_scale_roi_align");
  });
  return out;
}

std::vector<at::Tensor> multi_scale_roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                                           at::ArrayRef<double> scales, int64_t pooled_height,
                                                           int64_t pooled_width, int64_t sampling_ratio,
                                                           bool aligned, double canonical_scale,
                                                           double canonical_level, int64_t batch_size,
                                                           int64_t channels, at::IntArrayRef heights,
                                                           at::IntArrayRef widths) {
  check_level_shapes(scales, heights, widths);
  check_pool_grad(grad, rois.size(0), channels, pooled_height, pooled_width, "multi_scale_roi_align backward");
  std::vector<LevelShape> levels;
  for (size_t l = 0; l < scales.size(); ++l) levels.push_back({heights[l], widths[l], scales[l]});
  const PoolParams pp{pooled_height, pooled_width, sampling_ratio, aligned};
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "multi_scale_roi_align_backward_cpu",
                                  [&] {
                                    out = roi_align_backward_cpu_typed<scalar_t>(
                                        grad, levels, rois, pp, batch_size, channels, canonical_scale,
                                        canonical_level, "multi_scale_roi_align backward");
                                  });
  return out;
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, CPU, m) {
  m.impl("roi_align", &fasterrcnn_ext::roi_align_forward_cpu);
  m.impl("_roi_align_backward", &fasterrcnn_ext::roi_align_backward_cpu);
  m.impl("multi_scale_roi_align", &fasterrcnn_ext::multi_scale_roi_align_cpu);
  m.impl("_multi_scale_roi_align_backward", &fasterrcnn_ext::multi_scale_roi_align_backward_cpu);
}

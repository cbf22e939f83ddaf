// CPU kernels of roi_align and multi_scale_roi_align, forward and backward.
//
// torchvision loops over RoIs serially and reads NCHW feature maps one channel at a time. Here the feature maps
// are read channels-last (NHWC; NCHW input is converted once), so every bilinear tap is a contiguous run of C
// values that the compiler vectorises; the sample positions and weights of each RoI are computed once, per axis,
// and shared by all channels. The forward runs in parallel over RoIs. The backward runs in parallel over channel
// blocks: every thread owns its channels of the gradient, so there are no races, and each gradient value is
// accumulated in RoI order whatever the number of threads (deterministic).
// roi_align is the one-level case of the multi-level kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops/common/checks.h"
#include "ops/common/roi_math.h"

namespace fasterrcnn_ext {
namespace {

// acc[c] += w1 * p1[c] + w2 * p2[c] + w3 * p3[c] + w4 * p4[c]: one bilinear sample for all channels.
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void bilinear_accumulate_impl(acc_t* __restrict__ acc, int64_t n,
                                                                    const scalar_t* __restrict__ p1,
                                                                    const scalar_t* __restrict__ p2,
                                                                    const scalar_t* __restrict__ p3,
                                                                    const scalar_t* __restrict__ p4, acc_t w1,
                                                                    acc_t w2, acc_t w3, acc_t w4) {
  for (int64_t c = 0; c < n; ++c) {
    acc[c] += w1 * static_cast<acc_t>(p1[c]) + w2 * static_cast<acc_t>(p2[c]) + w3 * static_cast<acc_t>(p3[c]) +
              w4 * static_cast<acc_t>(p4[c]);
  }
}

// p_k[c] += w_k * g[c]: the transpose of one bilinear sample.
template <typename acc_t>
__attribute__((always_inline)) inline void bilinear_scatter_impl(acc_t* p1, acc_t* p2, acc_t* p3, acc_t* p4,
                                                                 const acc_t* __restrict__ g, int64_t n, acc_t w1,
                                                                 acc_t w2, acc_t w3, acc_t w4) {
  // p1..p4 may alias (clamped border samples), so the four updates stay separate statements.
  for (int64_t c = 0; c < n; ++c) p1[c] += w1 * g[c];
  for (int64_t c = 0; c < n; ++c) p2[c] += w2 * g[c];
  for (int64_t c = 0; c < n; ++c) p3[c] += w3 * g[c];
  for (int64_t c = 0; c < n; ++c) p4[c] += w4 * g[c];
}

FRCNN_CPU_MULTIVERSION void bilinear_accumulate(float* acc, int64_t n, const float* p1, const float* p2,
                                                const float* p3, const float* p4, float w1, float w2, float w3,
                                                float w4) {
  bilinear_accumulate_impl<float, float>(acc, n, p1, p2, p3, p4, w1, w2, w3, w4);
}
FRCNN_CPU_MULTIVERSION void bilinear_accumulate(double* acc, int64_t n, const double* p1, const double* p2,
                                                const double* p3, const double* p4, double w1, double w2,
                                                double w3, double w4) {
  bilinear_accumulate_impl<double, double>(acc, n, p1, p2, p3, p4, w1, w2, w3, w4);
}
template <typename scalar_t>  // float16, bfloat16: converted on load, accumulated in float
void bilinear_accumulate(float* acc, int64_t n, const scalar_t* p1, const scalar_t* p2, const scalar_t* p3,
                         const scalar_t* p4, float w1, float w2, float w3, float w4) {
  bilinear_accumulate_impl<scalar_t, float>(acc, n, p1, p2, p3, p4, w1, w2, w3, w4);
}

FRCNN_CPU_MULTIVERSION void bilinear_scatter(float* p1, float* p2, float* p3, float* p4, const float* g, int64_t n,
                                             float w1, float w2, float w3, float w4) {
  bilinear_scatter_impl<float>(p1, p2, p3, p4, g, n, w1, w2, w3, w4);
}
FRCNN_CPU_MULTIVERSION void bilinear_scatter(double* p1, double* p2, double* p3, double* p4, const double* g,
                                             int64_t n, double w1, double w2, double w3, double w4) {
  bilinear_scatter_impl<double>(p1, p2, p3, p4, g, n, w1, w2, w3, w4);
}

// The valid samples of one RoI, per axis and per bin: bin p of the rows uses ys[y_begin[p] .. y_begin[p + 1]).
template <typename acc_t>
struct RoISamples {
  std::vector<AxisWeights<acc_t>> ys, xs;
  std::vector<int64_t> y_begin, x_begin;
  acc_t count = 1;

  static void build_axis(acc_t start, acc_t bin_size, int64_t grid, int64_t pooled, int64_t size,
                         std::vector<AxisWeights<acc_t>>& out, std::vector<int64_t>& begin) {
    out.clear();
    begin.resize(pooled + 1);
    for (int64_t p = 0; p < pooled; ++p) {
      begin[p] = static_cast<int64_t>(out.size());
      for (int64_t i = 0; i < grid; ++i) {
        AxisWeights<acc_t> w;
        if (interpolation_weights(roi_align_sample(start, p, bin_size, i, grid), size, w)) out.push_back(w);
      }
    }
    begin[pooled] = static_cast<int64_t>(out.size());
  }

  void build(const acc_t* roi, acc_t scale, int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,
             bool aligned, int64_t height, int64_t width) {
    const RoIAlignGeometry<acc_t> g = roi_align_geometry(roi[1], roi[2], roi[3], roi[4], scale, pooled_h, pooled_w,
                                                         sampling_ratio, aligned, height, width);
    build_axis(g.start_h, g.bin_h, g.grid_h, pooled_h, height, ys, y_begin);
    build_axis(g.start_w, g.bin_w, g.grid_w, pooled_w, width, xs, x_begin);
    count = g.count;
  }
};

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

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
RoIList<acc_t> read_rois(const at::Tensor& rois_in, int64_t batch_size, const std::vector<LevelShape>& levels,
                         double canonical_scale, double canonical_level, const char* op) {
  const at::Tensor rois = rois_in.contiguous();
  const scalar_t* p = rois.data_ptr<scalar_t>();
  RoIList<acc_t> list;
  const int64_t k = rois.size(0);
  list.data.resize(5 * k);
  list.batch.resize(k);
  list.level.assign(k, 0);
  for (int64_t i = 0; i < 5 * k; ++i) list.data[i] = static_cast<acc_t>(p[i]);
  for (int64_t r = 0; r < k; ++r) {
    const acc_t b = list.data[5 * r];
    TORCH_CHECK(b >= 0 && b < static_cast<acc_t>(batch_size), op, ": rois[", r, ", 0] = ", b,
                " is not a valid batch index: the input has batch size ", batch_size);
    list.batch[r] = static_cast<int64_t>(b);
  }
  if (levels.size() > 1) {
    // The levels of an FPN: k_min and k_max from the finest and coarsest scales (powers of 2).
    const int64_t k_min = static_cast<int64_t>(-std::log2(levels.front().scale));
    const int64_t k_max = static_cast<int64_t>(-std::log2(levels.back().scale));
    for (int64_t r = 0; r < k; ++r) {
      const acc_t* roi = list.roi(r);
      // fp32 for the level, as torchvision's LevelMapper (the boxes' dtype there; float32 in the models).
      list.level[r] = fpn_level<float>(roi[1], roi[2], roi[3], roi[4], static_cast<float>(canonical_scale),
                                       static_cast<float>(canonical_level), k_min, k_max, 1e-6f);
    }
  }
  return list;
}

template <typename scalar_t>
at::Tensor roi_align_forward_cpu_typed(const std::vector<at::Tensor>& features_nhwc,
                                       const std::vector<LevelShape>& levels, const at::Tensor& rois,
                                       const PoolParams& pp, double canonical_scale, double canonical_level,
                                       const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = features_nhwc[0].size(0), channels = features_nhwc[0].size(1);
  const RoIList<acc_t> list = read_rois<scalar_t>(rois, batch, levels, canonical_scale, canonical_level, op);
  const int64_t k = list.size(), ph = pp.pooled_h, pw = pp.pooled_w;
  at::Tensor output = at::empty({k, channels, ph, pw}, features_nhwc[0].options().memory_format(at::MemoryFormat::Contiguous));
  if (k == 0 || channels == 0) return output;
  std::vector<const scalar_t*> data(levels.size());
  for (size_t l = 0; l < levels.size(); ++l) data[l] = features_nhwc[l].data_ptr<scalar_t>();
  scalar_t* out = output.data_ptr<scalar_t>();

  at::parallel_for(0, k, 1, [&](int64_t lo, int64_t hi) {
    RoISamples<acc_t> s;
    // One RoI's output, bin-major ([PH * PW, C], a few tens of KB): accumulated in cache, then written to the
    // NCHW output one channel row at a time. Writing each bin's channels straight to the [K, C, PH, PW] output
    // would touch a new cache line per value.
    std::vector<acc_t> roi_out(ph * pw * channels);
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t l = list.level[r];
      const int64_t height = levels[l].height, width = levels[l].width;
      s.build(list.roi(r), static_cast<acc_t>(levels[l].scale), ph, pw, pp.sampling_ratio, pp.aligned, height, width);
      const scalar_t* base = data[l] + list.batch[r] * height * width * channels;
      for (int64_t p = 0; p < ph; ++p) {
        for (int64_t q = 0; q < pw; ++q) {
          acc_t* acc = roi_out.data() + (p * pw + q) * channels;
          std::fill(acc, acc + channels, acc_t(0));
          for (int64_t yi = s.y_begin[p]; yi < s.y_begin[p + 1]; ++yi) {
            const AxisWeights<acc_t>& y = s.ys[yi];
            for (int64_t xi = s.x_begin[q]; xi < s.x_begin[q + 1]; ++xi) {
              const AxisWeights<acc_t>& x = s.xs[xi];
              bilinear_accumulate(acc, channels, base + (y.low * width + x.low) * channels,
                                  base + (y.low * width + x.high) * channels,
                                  base + (y.high * width + x.low) * channels,
                                  base + (y.high * width + x.high) * channels, y.w_low * x.w_low,
                                  y.w_low * x.w_high, y.w_high * x.w_low, y.w_high * x.w_high);
            }
          }
        }
      }
      const int64_t bins = ph * pw;
      scalar_t* o = out + r * channels * bins;
      for (int64_t c = 0; c < channels; ++c) {
        for (int64_t b = 0; b < bins; ++b) o[c * bins + b] = static_cast<scalar_t>(roi_out[b * channels + c] / s.count);
      }
    }
  });
  return output;
}

template <typename scalar_t>
std::vector<at::Tensor> roi_align_backward_cpu_typed(const at::Tensor& grad, const std::vector<LevelShape>& levels,
                                                     const at::Tensor& rois, const PoolParams& pp, int64_t batch,
                                                     int64_t channels, double canonical_scale,
                                                     double canonical_level, const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  const RoIList<acc_t> list = read_rois<scalar_t>(rois, batch, levels, canonical_scale, canonical_level, op);
  const int64_t k = list.size(), ph = pp.pooled_h, pw = pp.pooled_w;
  // Gradients accumulate in acc_t, channels-last, then are returned as channels-last tensors.
  const auto acc_opts = grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  std::vector<at::Tensor> grad_acc;
  std::vector<acc_t*> gdata;
  for (const LevelShape& lv : levels) {
    grad_acc.push_back(at::zeros({batch, lv.height, lv.width, channels}, acc_opts));
    gdata.push_back(grad_acc.back().data_ptr<acc_t>());
  }
  if (k > 0 && channels > 0) {
    // grad_output as [K, ph, pw, C] so each bin's gradient is a contiguous channel vector.
    const at::Tensor g_nhwc = grad.permute({0, 2, 3, 1}).to(acc_opts.dtype()).contiguous();
    const acc_t* g = g_nhwc.data_ptr<acc_t>();
    constexpr int64_t kMinChannelsPerTask = 16;  // keeps the inner loops long enough to vectorise
    at::parallel_for(0, channels, kMinChannelsPerTask, [&](int64_t c0, int64_t c1) {
      RoISamples<acc_t> s;
      std::vector<acc_t> gbin(c1 - c0);
      for (int64_t r = 0; r < k; ++r) {
        const int64_t l = list.level[r];
        const int64_t height = levels[l].height, width = levels[l].width;
        s.build(list.roi(r), static_cast<acc_t>(levels[l].scale), ph, pw, pp.sampling_ratio, pp.aligned, height,
                width);
        acc_t* base = gdata[l] + list.batch[r] * height * width * channels + c0;
        for (int64_t p = 0; p < ph; ++p) {
          for (int64_t q = 0; q < pw; ++q) {
            const acc_t* gsrc = g + ((r * ph + p) * pw + q) * channels + c0;
            for (int64_t c = 0; c < c1 - c0; ++c) gbin[c] = gsrc[c] / s.count;
            for (int64_t yi = s.y_begin[p]; yi < s.y_begin[p + 1]; ++yi) {
              const AxisWeights<acc_t>& y = s.ys[yi];
              for (int64_t xi = s.x_begin[q]; xi < s.x_begin[q + 1]; ++xi) {
                const AxisWeights<acc_t>& x = s.xs[xi];
                bilinear_scatter(base + (y.low * width + x.low) * channels, base + (y.low * width + x.high) * channels,
                                 base + (y.high * width + x.low) * channels,
                                 base + (y.high * width + x.high) * channels, gbin.data(), c1 - c0,
                                 y.w_low * x.w_low, y.w_low * x.w_high, y.w_high * x.w_low, y.w_high * x.w_high);
              }
            }
          }
        }
      }
    });
  }
  std::vector<at::Tensor> result;
  for (const at::Tensor& t : grad_acc) {
    // [N, H, W, C] memory viewed as an [N, C, H, W] channels-last tensor.
    result.push_back(t.permute({0, 3, 1, 2}).to(grad.scalar_type()));
  }
  return result;
}

std::vector<at::Tensor> to_channels_last(const std::vector<at::Tensor>& features) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& f : features) out.push_back(f.contiguous(at::MemoryFormat::ChannelsLast));
  return out;
}

at::Tensor roi_align_forward_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                 int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  check_roi_inputs(input, rois, spatial_scale, pooled_height, pooled_width, "roi_align");
  const std::vector<LevelShape> levels{{input.size(2), input.size(3), spatial_scale}};
  const PoolParams pp{pooled_height, pooled_width, sampling_ratio, aligned};
  const std::vector<at::Tensor> features = to_channels_last({input});
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_forward_cpu", [&] {
    out = roi_align_forward_cpu_typed<scalar_t>(features, levels, rois, pp, 0, 0, "roi_align");
  });
  return out;
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width, int64_t sampling_ratio, bool aligned) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                  grad.size(2) == pooled_height && grad.size(3) == pooled_width,
              "roi_align backward: grad must be [K, C, pooled_height, pooled_width] = [", rois.size(0), ", ",
              channels, ", ", pooled_height, ", ", pooled_width, "], got ", grad.sizes());
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
  const std::vector<at::Tensor> nhwc = to_channels_last(features.vec());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rois.scalar_type(), "multi_scale_roi_align_cpu", [&] {
    out = roi_align_forward_cpu_typed<scalar_t>(nhwc, levels, rois, pp, canonical_scale, canonical_level,
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
  TORCH_CHECK(heights.size() == scales.size() && widths.size() == scales.size(),
              "multi_scale_roi_align backward: heights, widths and scales must have the same length");
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

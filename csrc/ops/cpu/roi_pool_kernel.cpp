// CPU kernels of roi_pool, forward and backward.
//
// Forward: channels-last reads (NCHW input is converted once), so each bin's max over its window is a running max
// over contiguous channel vectors, which the compiler vectorises; parallel over RoIs. Backward: a scatter of each
// output gradient to its argmax, parallel over channels (each thread owns its planes: no races, deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cfloat>
#include <vector>

#include "ops/common/checks.h"
#include "ops/common/roi_math.h"

namespace fasterrcnn_ext {
namespace {

// Running max of a bin window for all channels; the first occurrence wins ties (strict >), as in torchvision.
// The index is int32 (a plane has fewer than 2^31 pixels, checked) so the loop has one vector width with float.
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void running_max_impl(acc_t* __restrict__ best, int32_t* __restrict__ arg,
                                                            const scalar_t* __restrict__ v, int64_t n,
                                                            int32_t index) {
  for (int64_t c = 0; c < n; ++c) {
    const acc_t x = static_cast<acc_t>(v[c]);
    const bool greater = x > best[c];
    best[c] = greater ? x : best[c];
    arg[c] = greater ? index : arg[c];
  }
}
FRCNN_CPU_MULTIVERSION void running_max(float* best, int32_t* arg, const float* v, int64_t n, int32_t index) {
  running_max_impl<float, float>(best, arg, v, n, index);
}
FRCNN_CPU_MULTIVERSION void running_max(double* best, int32_t* arg, const double* v, int64_t n, int32_t index) {
  running_max_impl<double, double>(best, arg, v, n, index);
}
template <typename scalar_t>
void running_max(float* best, int32_t* arg, const scalar_t* v, int64_t n, int32_t index) {
  running_max_impl<scalar_t, float>(best, arg, v, n, index);
}

// The rounded RoI on the feature map (torchvision's RoIPool geometry); `valid` is false for NaN coordinates.
template <typename acc_t>
struct RoIPoolGeometry {
  int64_t start_h, start_w;
  acc_t bin_h, bin_w;
  bool valid;
};

template <typename acc_t>
RoIPoolGeometry<acc_t> roi_pool_geometry(const acc_t* roi, acc_t scale, int64_t pooled_h, int64_t pooled_w) {
  RoIPoolGeometry<acc_t> g;
  bool ok = true;
  g.start_w = roi_pool_round(roi[1] * scale, ok);
  g.start_h = roi_pool_round(roi[2] * scale, ok);
  const int64_t end_w = roi_pool_round(roi[3] * scale, ok);
  const int64_t end_h = roi_pool_round(roi[4] * scale, ok);
  const int64_t roi_w = std::max<int64_t>(end_w - g.start_w + 1, 1);  // malformed RoIs become 1x1
  const int64_t roi_h = std::max<int64_t>(end_h - g.start_h + 1, 1);
  g.bin_h = static_cast<acc_t>(roi_h) / static_cast<acc_t>(pooled_h);
  g.bin_w = static_cast<acc_t>(roi_w) / static_cast<acc_t>(pooled_w);
  g.valid = ok;
  return g;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cpu_typed(const at::Tensor& input, const at::Tensor& rois_in,
                                                              double spatial_scale, int64_t ph, int64_t pw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = input.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  const int64_t k = rois_in.size(0);
  TORCH_CHECK(height * width < (int64_t{1} << 31), "roi_pool: the input plane has ", height, " x ", width,
              " pixels; at most 2^31 - 1 are supported");
  at::Tensor output = at::empty({k, channels, ph, pw}, input.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor argmax = at::empty({k, channels, ph, pw}, input.options().dtype(at::kLong).memory_format(at::MemoryFormat::Contiguous));
  if (k == 0 || channels == 0) return {output, argmax};
  const at::Tensor rois_t = rois_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* rois = rois_t.data_ptr<acc_t>();
  for (int64_t r = 0; r < k; ++r) {
    const acc_t b = rois[5 * r];
    TORCH_CHECK(b >= 0 && b < static_cast<acc_t>(batch), "roi_pool: rois[", r, ", 0] = ", b,
                " is not a valid batch index: the input has batch size ", batch);
  }
  const at::Tensor nhwc = input.contiguous(at::MemoryFormat::ChannelsLast);
  const scalar_t* data = nhwc.data_ptr<scalar_t>();
  scalar_t* out = output.data_ptr<scalar_t>();
  int64_t* arg_out = argmax.data_ptr<int64_t>();
  const acc_t scale = static_cast<acc_t>(spatial_scale);

  at::parallel_for(0, k, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> best(channels);
    std::vector<int32_t> arg(channels);
    for (int64_t r = lo; r < hi; ++r) {
      const acc_t* roi = rois + 5 * r;
      const RoIPoolGeometry<acc_t> g = roi_pool_geometry(roi, scale, ph, pw);
      const scalar_t* base = data + static_cast<int64_t>(roi[0]) * height * width * channels;
      for (int64_t p = 0; p < ph; ++p) {
        int64_t h0 = 0, h1 = 0;
        if (g.valid) roi_pool_bin(p, g.bin_h, g.start_h, height, h0, h1);
        for (int64_t q = 0; q < pw; ++q) {
          int64_t w0 = 0, w1 = 0;
          if (g.valid) roi_pool_bin(q, g.bin_w, g.start_w, width, w0, w1);
          const bool empty = h1 <= h0 || w1 <= w0;
          std::fill(best.begin(), best.end(), empty ? acc_t(0) : static_cast<acc_t>(-FLT_MAX));
          std::fill(arg.begin(), arg.end(), int32_t{-1});
          for (int64_t h = h0; h < h1; ++h) {
            for (int64_t w = w0; w < w1; ++w) {
              running_max(best.data(), arg.data(), base + (h * width + w) * channels, channels,
                          static_cast<int32_t>(h * width + w));
            }
          }
          const int64_t o = (r * channels * ph + p) * pw + q;
          for (int64_t c = 0; c < channels; ++c) {
            out[o + c * ph * pw] = static_cast<scalar_t>(best[c]);
            arg_out[o + c * ph * pw] = arg[c];
          }
        }
      }
    }
  });
  return {output, argmax};
}

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cpu(const at::Tensor& input, const at::Tensor& rois,
                                                        double spatial_scale, int64_t pooled_height,
                                                        int64_t pooled_width) {
  check_roi_inputs(input, rois, spatial_scale, pooled_height, pooled_width, "roi_pool");
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_pool_forward_cpu", [&] {
    out = roi_pool_forward_cpu_typed<scalar_t>(input, rois, spatial_scale, pooled_height, pooled_width);
  });
  return out;
}

at::Tensor roi_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
                                 double spatial_scale, int64_t pooled_height, int64_t pooled_width,
                                 int64_t batch_size, int64_t channels, int64_t height, int64_t width) {
  const int64_t k = rois.size(0);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == k && grad.size(1) == channels && grad.size(2) == pooled_height &&
                  grad.size(3) == pooled_width,
              "roi_pool backward: grad must be [K, C, pooled_height, pooled_width] = [", k, ", ", channels, ", ",
              pooled_height, ", ", pooled_width, "], got ", grad.sizes());
  TORCH_CHECK(argmax.sizes() == grad.sizes(), "roi_pool backward: argmax must have the shape of grad ", grad.sizes(),
              ", got ", argmax.sizes());
  at::Tensor grad_input = at::zeros({batch_size, channels, height, width}, grad.options());
  if (k == 0 || channels == 0) return grad_input;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor g_t = grad.contiguous();
    const at::Tensor a_t = argmax.to(at::kLong).contiguous();
    const at::Tensor rois_t = rois.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const scalar_t* g = g_t.data_ptr<scalar_t>();
    const int64_t* a = a_t.data_ptr<int64_t>();
    const acc_t* roi = rois_t.data_ptr<acc_t>();
    scalar_t* gin = grad_input.data_ptr<scalar_t>();
    const int64_t plane = height * width, bins = pooled_height * pooled_width;
    for (int64_t r = 0; r < k; ++r) {
      const acc_t b = roi[5 * r];
      TORCH_CHECK(b >= 0 && b < static_cast<acc_t>(batch_size), "roi_pool backward: rois[", r, ", 0] = ", b,
                  " is not a valid batch index: the input has batch size ", batch_size);
    }
    at::parallel_for(0, channels, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = 0; r < k; ++r) {
          scalar_t* dst = gin + (static_cast<int64_t>(roi[5 * r]) * channels + c) * plane;
          const int64_t o = (r * channels + c) * bins;
          for (int64_t i = 0; i < bins; ++i) {
            const int64_t idx = a[o + i];
            // An empty bin has argmax -1 and no gradient; an index outside the plane is bad input, not a write.
            if (idx >= 0 && idx < plane) dst[idx] = static_cast<scalar_t>(static_cast<acc_t>(dst[idx]) + static_cast<acc_t>(g[o + i]));
          }
        }
      }
    });
  });
  return grad_input;
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, CPU, m) {
  m.impl("roi_pool", &fasterrcnn_ext::roi_pool_forward_cpu);
  m.impl("_roi_pool_backward", &fasterrcnn_ext::roi_pool_backward_cpu);
}

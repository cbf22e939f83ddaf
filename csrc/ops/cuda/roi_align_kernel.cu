// CUDA kernels of roi_align and multi_scale_roi_align, forward and backward.
//
// One thread per output element (RoI, channel, bin), NCHW input; roi_align is the one-level case of the multi-level
// kernel, which picks each RoI's FPN level on the device (no host sync, no per-level launches). Geometry, level and
// bilinear weights are the shared roi_math.h functions of the CPU kernel. float16/bfloat16 accumulate in float32;
// indices are int64. A RoI whose batch index is outside [0, N) trips a device-side assert and is never read.
// Backward: atomics into a float32 (float64 for double) buffer; under torch.use_deterministic_algorithms(True), one
// thread per (image, channel) plane accumulates every RoI in order instead, without atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "ops/common/checks.h"
#include "ops/common/roi_math.h"

namespace fasterrcnn_ext {
namespace {

constexpr int kMaxLevels = 8;
constexpr int kThreads = 256;

// The pyramid as passed to the kernels (by value).
template <typename T>
struct Levels {
  T* data[kMaxLevels];
  int64_t height[kMaxLevels], width[kMaxLevels];
  double scale[kMaxLevels];
  int num;
  int64_t k_min, k_max;
};

struct Pool {
  int64_t pooled_h, pooled_w, sampling_ratio, batch, channels, num_rois;
  bool aligned;
  float canonical_scale, canonical_level;
};

template <typename T, typename acc_t>
__device__ __forceinline__ int roi_level(const Levels<T>& lv, const Pool& pp, const acc_t* roi) {
  if (lv.num == 1) return 0;
  return static_cast<int>(fpn_level<float>(roi[1], roi[2], roi[3], roi[4], pp.canonical_scale, pp.canonical_level,
                                           lv.k_min, lv.k_max, 1e-6f));
}

// Output element idx of [K, C, PH, PW] -> its RoI r, channel c and bin (p, q); the RoI read in acc_t. Returns
// whether the RoI's batch index is in [0, N) (the caller asserts, naming its op).
struct Bin {
  int64_t r, c, p, q;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ bool load_bin(int64_t idx, const Pool& pp, const scalar_t* __restrict__ rois, Bin& bin,
                                         acc_t* roi) {
  bin.q = idx % pp.pooled_w;
  bin.p = (idx / pp.pooled_w) % pp.pooled_h;
  bin.c = (idx / (pp.pooled_w * pp.pooled_h)) % pp.channels;
  bin.r = idx / (pp.pooled_w * pp.pooled_h * pp.channels);
  for (int i = 0; i < 5; ++i) roi[i] = static_cast<acc_t>(rois[5 * bin.r + i]);
  return roi[0] >= 0 && roi[0] < static_cast<acc_t>(pp.batch);
}

template <typename scalar_t>
__global__ void roi_align_forward_kernel(int64_t total, Levels<const scalar_t> lv, const scalar_t* __restrict__ rois,
                                         Pool pp, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    Bin bin;
    acc_t roi[5];
    const bool batch_ok = load_bin(idx, pp, rois, bin, roi);
    const int64_t c = bin.c, p = bin.p, q = bin.q;
    CUDA_KERNEL_ASSERT(batch_ok && "roi_align: a RoI's batch index is outside [0, N)");
    if (!batch_ok) {
      out[idx] = scalar_t(0);
      continue;
    }
    const int l = roi_level(lv, pp, roi);
    const int64_t height = lv.height[l], width = lv.width[l];
    const RoIAlignGeometry<acc_t> g =
        roi_align_geometry(roi[1], roi[2], roi[3], roi[4], static_cast<acc_t>(lv.scale[l]), pp.pooled_h,
                           pp.pooled_w, pp.sampling_ratio, pp.aligned, height, width);
    const scalar_t* plane = lv.data[l] + (static_cast<int64_t>(roi[0]) * pp.channels + c) * height * width;
    acc_t sum = 0;
    for (int64_t iy = 0; iy < g.grid_h; ++iy) {
      AxisWeights<acc_t> y;
      if (!interpolation_weights(roi_align_sample(g.start_h, p, g.bin_h, iy, g.grid_h), height, y)) continue;
      for (int64_t ix = 0; ix < g.grid_w; ++ix) {
        AxisWeights<acc_t> x;
        if (!interpolation_weights(roi_align_sample(g.start_w, q, g.bin_w, ix, g.grid_w), width, x)) continue;
        sum += y.w_low * x.w_low * static_cast<acc_t>(plane[y.low * width + x.low]) +
               y.w_low * x.w_high * static_cast<acc_t>(plane[y.low * width + x.high]) +
               y.w_high * x.w_low * static_cast<acc_t>(plane[y.high * width + x.low]) +
               y.w_high * x.w_high * static_cast<acc_t>(plane[y.high * width + x.high]);
      }
    }
    out[idx] = static_cast<scalar_t>(sum / g.count);
  }
}

// Scatters the gradient of output element (r, c, p, q) to its plane: atomically, or plainly when the caller
// guarantees one writer per plane (the deterministic kernel).
template <bool kAtomic, typename scalar_t, typename acc_t>
__device__ __forceinline__ void scatter_bin(const Levels<acc_t>& gl, const Pool& pp, const acc_t* roi, int l,
                                            int64_t c, int64_t p, int64_t q, acc_t grad) {
  const int64_t height = gl.height[l], width = gl.width[l];
  const RoIAlignGeometry<acc_t> g =
      roi_align_geometry(roi[1], roi[2], roi[3], roi[4], static_cast<acc_t>(gl.scale[l]), pp.pooled_h, pp.pooled_w,
                         pp.sampling_ratio, pp.aligned, height, width);
  acc_t* plane = gl.data[l] + (static_cast<int64_t>(roi[0]) * pp.channels + c) * height * width;
  const acc_t gbin = grad / g.count;
  for (int64_t iy = 0; iy < g.grid_h; ++iy) {
    AxisWeights<acc_t> y;
    if (!interpolation_weights(roi_align_sample(g.start_h, p, g.bin_h, iy, g.grid_h), height, y)) continue;
    for (int64_t ix = 0; ix < g.grid_w; ++ix) {
      AxisWeights<acc_t> x;
      if (!interpolation_weights(roi_align_sample(g.start_w, q, g.bin_w, ix, g.grid_w), width, x)) continue;
      acc_t* t[4] = {plane + y.low * width + x.low, plane + y.low * width + x.high, plane + y.high * width + x.low,
                     plane + y.high * width + x.high};
      const acc_t w[4] = {y.w_low * x.w_low, y.w_low * x.w_high, y.w_high * x.w_low, y.w_high * x.w_high};
      for (int k = 0; k < 4; ++k) {
        if (kAtomic) {
          atomicAdd(t[k], w[k] * gbin);
        } else {
          *t[k] += w[k] * gbin;
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void roi_align_backward_kernel(int64_t total, Levels<acc_t> gl, const scalar_t* __restrict__ rois,
                                          Pool pp, const scalar_t* __restrict__ grad, int64_t gs0, int64_t gs1,
                                          int64_t gs2, int64_t gs3) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    Bin bin;
    acc_t roi[5];
    const bool batch_ok = load_bin(idx, pp, rois, bin, roi);
    const int64_t r = bin.r, c = bin.c, p = bin.p, q = bin.q;
    CUDA_KERNEL_ASSERT(batch_ok && "roi_align backward: a RoI's batch index is outside [0, N)");
    if (!batch_ok) continue;
    const int l = roi_level(gl, pp, roi);
    scatter_bin<true, scalar_t>(gl, pp, roi, l, c, p, q,
                                static_cast<acc_t>(grad[r * gs0 + c * gs1 + p * gs2 + q * gs3]));
  }
}

// Deterministic: thread (n, c) owns plane c of image n on every level and adds every RoI's gradient in order.
template <typename scalar_t, typename acc_t>
__global__ void roi_align_backward_deterministic_kernel(Levels<acc_t> gl, const scalar_t* __restrict__ rois, Pool pp,
                                                        const scalar_t* __restrict__ grad, int64_t gs0, int64_t gs1,
                                                        int64_t gs2, int64_t gs3) {
  const int64_t plane_id = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (plane_id >= pp.batch * pp.channels) return;
  const int64_t n = plane_id / pp.channels, c = plane_id % pp.channels;
  for (int64_t r = 0; r < pp.num_rois; ++r) {
    acc_t roi[5];
    for (int i = 0; i < 5; ++i) roi[i] = static_cast<acc_t>(rois[5 * r + i]);
    const bool batch_ok = roi[0] >= 0 && roi[0] < static_cast<acc_t>(pp.batch);
    CUDA_KERNEL_ASSERT(batch_ok && "roi_align backward: a RoI's batch index is outside [0, N)");
    if (!batch_ok || static_cast<int64_t>(roi[0]) != n) continue;
    const int l = roi_level(gl, pp, roi);
    for (int64_t p = 0; p < pp.pooled_h; ++p) {
      for (int64_t q = 0; q < pp.pooled_w; ++q) {
        scatter_bin<false, scalar_t>(gl, pp, roi, l, c, p, q,
                                     static_cast<acc_t>(grad[r * gs0 + c * gs1 + p * gs2 + q * gs3]));
      }
    }
  }
}

int64_t blocks_for(int64_t total) {
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{1} << 20));
}

template <typename T>
Levels<T> make_levels(const std::vector<T*>& data, at::IntArrayRef heights, at::IntArrayRef widths,
                      at::ArrayRef<double> scales) {
  check_num_levels(static_cast<int64_t>(data.size()), kMaxLevels, "multi_scale_roi_align (CUDA)");
  Levels<T> lv{};
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

at::Tensor forward_cuda(const std::vector<at::Tensor>& features_in, const at::Tensor& rois_in,
                        at::ArrayRef<double> scales, const Pool& pool_in) {
  const c10::cuda::CUDAGuard guard(rois_in.device());
  std::vector<at::Tensor> features;
  std::vector<int64_t> heights, widths;
  for (const at::Tensor& f : features_in) {
    check_cuda(f, "input", "roi_align");
    features.push_back(f.contiguous());
    heights.push_back(f.size(2));
    widths.push_back(f.size(3));
  }
  const at::Tensor rois = rois_in.contiguous();
  Pool pp = pool_in;
  pp.batch = features[0].size(0);
  pp.channels = features[0].size(1);
  pp.num_rois = rois.size(0);
  at::Tensor out = at::empty({pp.num_rois, pp.channels, pp.pooled_h, pp.pooled_w}, features[0].options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "roi_align_forward_cuda", [&] {
    std::vector<const scalar_t*> data;
    for (const at::Tensor& f : features) data.push_back(f.data_ptr<scalar_t>());
    const Levels<const scalar_t> lv = make_levels(data, heights, widths, scales);
    roi_align_forward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        total, lv, rois.data_ptr<scalar_t>(), pp, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& grad, const at::Tensor& rois_in, at::ArrayRef<double> scales,
                                      const Pool& pool_in, at::IntArrayRef heights, at::IntArrayRef widths) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor rois = rois_in.contiguous();
  Pool pp = pool_in;
  pp.num_rois = rois.size(0);
  check_pool_grad(grad, pp.num_rois, pp.channels, pp.pooled_h, pp.pooled_w, "roi_align backward");
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<at::Tensor> acc;
    std::vector<acc_t*> data;
    for (size_t l = 0; l < heights.size(); ++l) {
      acc.push_back(at::zeros({pp.batch, pp.channels, heights[l], widths[l]},
                              grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value)));
      data.push_back(acc.back().data_ptr<acc_t>());
    }
    const Levels<acc_t> gl = make_levels(data, heights, widths, scales);
    const int64_t total = grad.numel();
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (total > 0 && deterministic) {
      roi_align_backward_deterministic_kernel<scalar_t, acc_t>
          <<<blocks_for(pp.batch * pp.channels), kThreads, 0, stream>>>(gl, rois.data_ptr<scalar_t>(), pp,
                                                                         grad.data_ptr<scalar_t>(), grad.stride(0),
                                                                         grad.stride(1), grad.stride(2),
                                                                         grad.stride(3));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (total > 0) {
      roi_align_backward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
          total, gl, rois.data_ptr<scalar_t>(), pp, grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1),
          grad.stride(2), grad.stride(3));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    for (const at::Tensor& a : acc) result.push_back(a.to(grad.scalar_type()));
  });
  return result;
}

at::Tensor roi_align_forward_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  check_roi_inputs(input, rois, spatial_scale, pooled_height, pooled_width, "roi_align");
  const Pool pp{pooled_height, pooled_width, sampling_ratio, 0, 0, 0, aligned, 224.f, 4.f};
  const std::vector<double> scales{spatial_scale};
  return forward_cuda({input}, rois, scales, pp);
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                   int64_t pooled_height, int64_t pooled_width, int64_t batch_size, int64_t channels,
                                   int64_t height, int64_t width, int64_t sampling_ratio, bool aligned) {
  const Pool pp{pooled_height, pooled_width, sampling_ratio, batch_size, channels, 0, aligned, 224.f, 4.f};
  const std::vector<double> scales{spatial_scale};
  const std::vector<int64_t> heights{height}, widths{width};
  return backward_cuda(grad, rois, scales, pp, heights, widths)[0];
}

at::Tensor multi_scale_roi_align_cuda(at::TensorList features, const at::Tensor& rois, at::ArrayRef<double> scales,
                                      int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                      bool aligned, double canonical_scale, double canonical_level) {
  check_multi_scale_inputs(features, rois, scales, pooled_height, pooled_width);
  const Pool pp{pooled_height, pooled_width, sampling_ratio, 0, 0, 0, aligned, static_cast<float>(canonical_scale),
                static_cast<float>(canonical_level)};
  return forward_cuda(features.vec(), rois, scales, pp);
}

std::vector<at::Tensor> multi_scale_roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                                            at::ArrayRef<double> scales, int64_t pooled_height,
                                                            int64_t pooled_width, int64_t sampling_ratio,
                                                            bool aligned, double canonical_scale,
                                                            double canonical_level, int64_t batch_size,
                                                            int64_t channels, at::IntArrayRef heights,
                                                            at::IntArrayRef widths) {
  check_level_shapes(scales, heights, widths);
  const Pool pp{pooled_height, pooled_width, sampling_ratio, batch_size, channels, 0, aligned,
                static_cast<float>(canonical_scale), static_cast<float>(canonical_level)};
  return backward_cuda(grad, rois, scales, pp, heights, widths);
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, CUDA, m) {
  m.impl("roi_align", &fasterrcnn_ext::roi_align_forward_cuda);
  m.impl("_roi_align_backward", &fasterrcnn_ext::roi_align_backward_cuda);
  m.impl("multi_scale_roi_align", &fasterrcnn_ext::multi_scale_roi_align_cuda);
  m.impl("_multi_scale_roi_align_backward", &fasterrcnn_ext::multi_scale_roi_align_backward_cuda);
}

// CUDA kernels of roi_align and multi_scale_roi_align, forward and backward.
//
// Forward: one block per RoI (or per chunk of its channels), NCHW input. The block reads the RoI, its FPN level and
// geometry once, fills the RoI's sample table (each bin's valid samples and their bilinear weights) in shared
// memory, and its threads pool the (channel, bin) output elements from it; the steps are the HOST_DEVICE functions
// of common/roi_align_per_element.h, which the CPU twin `_roi_align_per_element` runs in the tests. roi_align is
// the one-level case of the multi-level kernel, which picks each RoI's level on the device (no host sync, no
// per-level launches). float16/bfloat16 maps are read in their dtype, accumulate in float32 and are written in their
// dtype; the RoIs reach the kernels in the accumulation type (float32 RoIs of a half map as they are); addresses
// are int64. A RoI whose batch index is
// outside [0, N) trips a device-side assert and is never read.
// Backward: one thread per output element, atomics into a float32 (float64 for double) buffer; under
// torch.use_deterministic_algorithms(True), the same threads add fixed-point int64 terms instead
// (common/fixed_point.h: integer atomics, whose sum does not depend on their order), which the private op
// _roi_align_backward_fixed_point exposes and its CPU twin checks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "ops/common/checks.h"
#include "ops/common/roi_align_per_element.h"
#include "ops/cuda/fixed_point.cuh"

namespace fasterrcnn_ext {
namespace {

constexpr int kThreads = 256;
// Shared memory for one RoI's sample table (24 bytes per sample and axis in float32): 7x7 bins with up to 36
// samples per bin side in float32, 27 in float64. Larger adaptive grids are pooled per element.
constexpr int kTableBytes = 12 * 1024;
// Output elements per forward block: enough to amortise the block's table over many elements, few enough that a
// thousand RoIs of 256 channels make thousands of blocks.
constexpr int64_t kElementsPerBlock = 2048;

template <typename T>
using Levels = RoIAlignLevels<T>;
using Pool = RoIAlignParams;

// RoI r's task, its coordinates read in acc_t.
template <typename acc_t, typename scalar_t, typename P>
__device__ __forceinline__ RoIAlignTask<acc_t> read_task(const Levels<P>& lv, const Pool& pp,
                                                         const scalar_t* __restrict__ rois, int64_t r) {
  acc_t roi[5];
  for (int i = 0; i < 5; ++i) roi[i] = static_cast<acc_t>(rois[5 * r + i]);
  return roi_align_task(lv, pp, roi);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    roi_align_forward_kernel(Levels<const scalar_t> lv, const at::opmath_type<scalar_t>* __restrict__ rois, Pool pp,
                             int64_t channels_per_block, int64_t table_limit, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ alignas(16) unsigned char table_bytes[kTableBytes];
  __shared__ RoIAlignTask<acc_t> shared_task;
  // The host checks bins < 2^31; its chunking gives channels_per_block * bins < kElementsPerBlock + bins (one
  // channel a block when bins >= kElementsPerBlock), so a chunk's element count fits in uint32.
  const uint32_t pooled_w = static_cast<uint32_t>(pp.pooled_w);
  const uint32_t bins = static_cast<uint32_t>(pp.pooled_h * pp.pooled_w);
  for (int64_t r = blockIdx.x; r < pp.num_rois; r += gridDim.x) {
    if (threadIdx.x == 0) shared_task = read_task<acc_t>(lv, pp, rois, r);
    __syncthreads();
    const RoIAlignTask<acc_t> task = shared_task;
    CUDA_KERNEL_ASSERT(task.valid && "roi_align: a RoI's batch index is outside [0, N)");
    const int64_t height = lv.height[task.level], width = lv.width[task.level];
    // Uniform over the block: every thread reads the same task.
    const bool use_table = task.valid && roi_align_table_bytes(task.g, pp.pooled_h, pp.pooled_w) <= table_limit;
    const RoIAlignTable<acc_t> table = roi_align_table_view(table_bytes, task.g, pp.pooled_h, pp.pooled_w);
    if (use_table) {
      for (int64_t i = threadIdx.x; i < pp.pooled_h + pp.pooled_w; i += blockDim.x) {
        roi_align_table_fill(table, task.g, i, pp.pooled_h, height, width);
      }
    }
    __syncthreads();
    for (int64_t c0 = blockIdx.y * channels_per_block; c0 < pp.channels; c0 += gridDim.y * channels_per_block) {
      const uint32_t elements = static_cast<uint32_t>(min(channels_per_block, pp.channels - c0)) * bins;
      scalar_t* o = out + (r * pp.channels + c0) * bins;
      const scalar_t* image = lv.data[task.level] + (task.image * pp.channels + c0) * height * width;
      for (uint32_t e = threadIdx.x; e < elements; e += blockDim.x) {
        acc_t v = 0;
        if (task.valid) {
          const uint32_t c = e / bins, b = e - c * bins, p = b / pooled_w, q = b - p * pooled_w;
          const scalar_t* plane = image + c * height * width;
          v = use_table ? roi_align_table_bin(table, task.g, plane, width, p, q)
                        : roi_align_direct_bin(task.g, plane, height, width, p, q);
        }
        o[e] = static_cast<scalar_t>(v);
      }
    }
    __syncthreads();  // the next RoI overwrites the task and the table
  }
}

// Output element idx of [K, C, PH, PW] -> its RoI r, channel c and bin (p, q).
struct Bin {
  int64_t r, c, p, q;
};

__device__ __forceinline__ Bin bin_of(int64_t idx, const Pool& pp) {
  Bin bin;
  bin.q = idx % pp.pooled_w;
  bin.p = (idx / pp.pooled_w) % pp.pooled_h;
  bin.c = (idx / (pp.pooled_w * pp.pooled_h)) % pp.channels;
  bin.r = idx / (pp.pooled_w * pp.pooled_h * pp.channels);
  return bin;
}

// Where the backward's terms go. FloatAtomicTarget: float atomics into acc_t planes. FixedPointTarget: fixed-point
// int64 sums and non-finite flags (common/fixed_point.h), its scale read from the device by bind(), once a thread.
template <typename acc_t>
struct FloatAtomicTarget {
  Levels<acc_t> planes;
  __device__ const Levels<acc_t>& levels() const { return planes; }
  __device__ FloatAtomicTarget bind() const { return *this; }
  __device__ void operator()(int level, int64_t i, acc_t term) const { atomicAdd(planes.data[level] + i, term); }
};

struct FixedPointTarget {
  Levels<int64_t> sums;
  Levels<int32_t> flags;
  const double* max_abs;
  int64_t terms;
  FixedPointScale scale;
  __device__ const Levels<int64_t>& levels() const { return sums; }
  __device__ FixedPointTarget bind() const {
    FixedPointTarget t = *this;
    t.scale = fixed_point_scale(*max_abs, terms);
    return t;
  }
  __device__ void operator()(int level, int64_t i, double term) const {
    fixed_point_atomic_add(sums.data[level] + i, flags.data[level] + i, term, scale);
  }
};

// One thread per output element: its gradient scattered to the samples of its bin.
template <typename scalar_t, typename acc_t, typename Target>
__global__ void roi_align_backward_kernel(int64_t total, Target target_in, const acc_t* __restrict__ rois, Pool pp,
                                          const scalar_t* __restrict__ grad, int64_t gs0, int64_t gs1, int64_t gs2,
                                          int64_t gs3) {
  const Target target = target_in.bind();
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const Bin bin = bin_of(idx, pp);
    const RoIAlignTask<acc_t> task = read_task<acc_t>(target.levels(), pp, rois, bin.r);
    CUDA_KERNEL_ASSERT(task.valid && "roi_align backward: a RoI's batch index is outside [0, N)");
    if (!task.valid) continue;
    const int64_t height = target.levels().height[task.level], width = target.levels().width[task.level];
    const int64_t plane = (task.image * pp.channels + bin.c) * height * width;
    roi_align_scatter_bin(task.g, height, width, bin.p, bin.q,
                          static_cast<acc_t>(grad[bin.r * gs0 + bin.c * gs1 + bin.p * gs2 + bin.q * gs3]),
                          [&](int64_t offset, acc_t term) { target(task.level, plane + offset, term); });
  }
}

int64_t blocks_for(int64_t total) {
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{1} << 20));
}

// table_bytes: a RoI whose sample table needs more is pooled per element (capped at the kernel's shared memory).
at::Tensor forward_cuda(const std::vector<at::Tensor>& features_in, const at::Tensor& rois_in,
                        at::ArrayRef<double> scales, const Pool& pool_in, int64_t table_bytes = kTableBytes) {
  const c10::cuda::CUDAGuard guard(rois_in.device());
  std::vector<at::Tensor> features;
  std::vector<int64_t> heights, widths;
  for (const at::Tensor& f : features_in) {
    check_cuda(f, "input", "roi_align");
    features.push_back(f.contiguous());
    heights.push_back(f.size(2));
    widths.push_back(f.size(3));
  }
  const at::Tensor rois = rois_in.to(at::toOpMathType(features[0].scalar_type())).contiguous();
  Pool pp = pool_in;
  pp.batch = features[0].size(0);
  pp.channels = features[0].size(1);
  pp.num_rois = rois.size(0);
  at::Tensor out = at::empty({pp.num_rois, pp.channels, pp.pooled_h, pp.pooled_w}, features[0].options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  // The forward's grid: RoIs along x, chunks of channels along y (kElementsPerBlock output elements a block).
  const int64_t bins = pp.pooled_h * pp.pooled_w;
  FRCNN_CHECK(bins <= std::numeric_limits<int32_t>::max(), "roi_align (CUDA): output_size (", pp.pooled_h, ", ",
              pp.pooled_w, ") has ", bins, " bins; at most 2^31 - 1 are supported");
  const int64_t chunks = std::min<int64_t>(pp.channels, (pp.channels * bins + kElementsPerBlock - 1) / kElementsPerBlock);
  const int64_t channels_per_block = (pp.channels + chunks - 1) / chunks;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(pp.num_rois, std::numeric_limits<int32_t>::max())),
                  static_cast<unsigned>(std::min<int64_t>((pp.channels + channels_per_block - 1) / channels_per_block,
                                                          65535)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "roi_align_forward_cuda", [&] {
    std::vector<const scalar_t*> data;
    for (const at::Tensor& f : features) data.push_back(f.data_ptr<scalar_t>());
    const Levels<const scalar_t> lv = make_roi_align_levels(data, heights, widths, scales, "multi_scale_roi_align (CUDA)");
    roi_align_forward_kernel<scalar_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        lv, rois.data_ptr<at::opmath_type<scalar_t>>(), pp, channels_per_block, std::min<int64_t>(table_bytes, kTableBytes),
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Deterministic: fixed-point sums (the private op _roi_align_backward_fixed_point).
std::vector<at::Tensor> backward_fixed_point_cuda(const at::Tensor& grad, const at::Tensor& rois_in,
                                                  at::ArrayRef<double> scales, const Pool& pool_in,
                                                  at::IntArrayRef heights, at::IntArrayRef widths) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor rois = rois_in.to(at::toOpMathType(grad.scalar_type())).contiguous();
  Pool pp = pool_in;
  pp.num_rois = rois.size(0);
  check_pool_grad(grad, pp.num_rois, pp.channels, pp.pooled_h, pp.pooled_w, "roi_align backward");
  std::vector<FixedPointSums> levels;
  std::vector<int64_t*> sums;
  std::vector<int32_t*> flags;
  for (size_t l = 0; l < heights.size(); ++l) {
    levels.emplace_back(at::IntArrayRef{pp.batch, pp.channels, heights[l], widths[l]}, grad.options());
    sums.push_back(levels.back().sums.data_ptr<int64_t>());
    flags.push_back(levels.back().flags.data_ptr<int32_t>());
  }
  const int64_t total = grad.numel(), terms = std::max<int64_t>(1, pp.num_rois * pp.pooled_h * pp.pooled_w);
  const at::Tensor max_abs = fixed_point_max_abs(grad);
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_fp_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const char* op = "multi_scale_roi_align backward (CUDA)";
    const Levels<int64_t> sl = make_roi_align_levels(sums, heights, widths, scales, op);
    const Levels<int32_t> fl = make_roi_align_levels(flags, heights, widths, scales, op);
    if (total > 0) {
      const FixedPointTarget target{sl, fl, max_abs.data_ptr<double>(), terms, FixedPointScale{}};
      roi_align_backward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          total, target, rois.data_ptr<acc_t>(), pp, grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1),
          grad.stride(2), grad.stride(3));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    for (const FixedPointSums& level : levels) result.push_back(fixed_point_values<scalar_t>(level, max_abs, terms));
  });
  return result;
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& grad, const at::Tensor& rois_in, at::ArrayRef<double> scales,
                                      const Pool& pool_in, at::IntArrayRef heights, at::IntArrayRef widths) {
  if (at::globalContext().deterministicAlgorithms()) {
    return backward_fixed_point_cuda(grad, rois_in, scales, pool_in, heights, widths);
  }
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor rois = rois_in.to(at::toOpMathType(grad.scalar_type())).contiguous();
  Pool pp = pool_in;
  pp.num_rois = rois.size(0);
  check_pool_grad(grad, pp.num_rois, pp.channels, pp.pooled_h, pp.pooled_w, "roi_align backward");
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
    const Levels<acc_t> gl = make_roi_align_levels(data, heights, widths, scales, "multi_scale_roi_align (CUDA)");
    const int64_t total = grad.numel();
    if (total > 0) {
      roi_align_backward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          total, FloatAtomicTarget<acc_t>{gl}, rois.data_ptr<acc_t>(), pp, grad.data_ptr<scalar_t>(),
          grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    for (const at::Tensor& a : acc) result.push_back(a.to(grad.scalar_type()));
  });
  return result;
}

at::Tensor roi_align_forward_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  check_roi_inputs(input, rois, spatial_scale, pooled_height, pooled_width, "roi_align");
  const Pool pp = one_level_roi_align_params(pooled_height, pooled_width, sampling_ratio, 0, 0, aligned);
  const std::vector<double> scales{spatial_scale};
  return forward_cuda({input}, rois, scales, pp);
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                   int64_t pooled_height, int64_t pooled_width, int64_t batch_size, int64_t channels,
                                   int64_t height, int64_t width, int64_t sampling_ratio, bool aligned) {
  const Pool pp = one_level_roi_align_params(pooled_height, pooled_width, sampling_ratio, batch_size, channels,
                                             aligned);
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

// _multi_scale_roi_align_backward (float atomics; fixed point under deterministic algorithms) and, kFixedPoint,
// _roi_align_backward_fixed_point.
template <bool kFixedPoint>
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
  return kFixedPoint ? backward_fixed_point_cuda(grad, rois, scales, pp, heights, widths)
                     : backward_cuda(grad, rois, scales, pp, heights, widths);
}

at::Tensor roi_align_per_element_cuda(at::TensorList features, const at::Tensor& rois, at::ArrayRef<double> scales,
                                      int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                      bool aligned, double canonical_scale, double canonical_level,
                                      int64_t table_bytes) {
  check_roi_align_per_element_inputs(features, rois, scales, pooled_height, pooled_width, table_bytes);
  const Pool pp{pooled_height, pooled_width, sampling_ratio, 0, 0, 0, aligned, static_cast<float>(canonical_scale),
                static_cast<float>(canonical_level)};
  return forward_cuda(features.vec(), rois, scales, pp, table_bytes);
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, CUDA, m) {
  m.impl("roi_align", &fasterrcnn_ext::roi_align_forward_cuda);
  m.impl("_roi_align_backward", &fasterrcnn_ext::roi_align_backward_cuda);
  m.impl("multi_scale_roi_align", &fasterrcnn_ext::multi_scale_roi_align_cuda);
  m.impl("_multi_scale_roi_align_backward", &fasterrcnn_ext::multi_scale_roi_align_backward_cuda<false>);
  m.impl("_roi_align_per_element", &fasterrcnn_ext::roi_align_per_element_cuda);
  m.impl("_roi_align_backward_fixed_point", &fasterrcnn_ext::multi_scale_roi_align_backward_cuda<true>);
}

// CUDA kernels of roi_pool, forward and backward.
//
// One thread per output element (RoI, channel, bin), NCHW input, int64 indices; the bin geometry is the shared
// roi_math.h code of the CPU kernel. float16/bfloat16 maps are read and written in their dtype, compared in float32;
// the RoIs reach the kernels in float32 (float64 for a float64 map), so float32 RoIs of a half map go as they are. A RoI whose batch index is outside [0, N) trips a device-side assert and is
// never read. Backward: atomics into a float32 (float64 for double) buffer, or under
// torch.use_deterministic_algorithms(True) fixed-point int64 atomics (common/fixed_point.h: the sum does not depend
// on the order of the adds), which the private op _roi_pool_backward_fixed_point exposes and its CPU twin checks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cfloat>
#include <tuple>

#include "ops/common/checks.h"
#include "ops/common/roi_math.h"
#include "ops/cuda/fixed_point.cuh"

namespace fasterrcnn_ext {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t total) {
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{1} << 20));
}

// kWriteArgmax: the training forward writes each bin's argmax for the backward; the inference op (roi_pool_values)
// does not write it at all (for the R50-FPN benchmark's 1,000 RoIs that is 100 MB of int64 not written).
template <typename scalar_t, bool kWriteArgmax>
__global__ void roi_pool_forward_kernel(int64_t total, const scalar_t* __restrict__ input,
                                        const at::opmath_type<scalar_t>* __restrict__ rois, int64_t batch,
                                        int64_t channels,
                                        int64_t height, int64_t width, int64_t ph, int64_t pw,
                                        at::opmath_type<scalar_t> scale, scalar_t* __restrict__ out,
                                        int64_t* __restrict__ argmax) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t q = idx % pw;
    const int64_t p = (idx / pw) % ph;
    const int64_t c = (idx / (pw * ph)) % channels;
    const int64_t r = idx / (pw * ph * channels);
    acc_t roi[5];
    for (int i = 0; i < 5; ++i) roi[i] = rois[5 * r + i];
    const bool batch_ok = roi[0] >= 0 && roi[0] < static_cast<acc_t>(batch);
    CUDA_KERNEL_ASSERT(batch_ok && "roi_pool: a RoI's batch index is outside [0, N)");
    bool ok = batch_ok;
    const int64_t start_w = roi_pool_round(roi[1] * scale, ok);
    const int64_t start_h = roi_pool_round(roi[2] * scale, ok);
    const int64_t end_w = roi_pool_round(roi[3] * scale, ok);
    const int64_t end_h = roi_pool_round(roi[4] * scale, ok);
    const int64_t roi_w = max(end_w - start_w + 1, int64_t{1});
    const int64_t roi_h = max(end_h - start_h + 1, int64_t{1});
    int64_t h0 = 0, h1 = 0, w0 = 0, w1 = 0;
    if (ok) {
      roi_pool_bin(p, static_cast<acc_t>(roi_h) / static_cast<acc_t>(ph), start_h, height, h0, h1);
      roi_pool_bin(q, static_cast<acc_t>(roi_w) / static_cast<acc_t>(pw), start_w, width, w0, w1);
    }
    const bool empty = h1 <= h0 || w1 <= w0;
    acc_t best = empty ? acc_t(0) : static_cast<acc_t>(-FLT_MAX);
    int64_t best_index = -1;
    if (!empty) {
      const scalar_t* plane = input + (static_cast<int64_t>(roi[0]) * channels + c) * height * width;
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t w = w0; w < w1; ++w) {
          const acc_t v = static_cast<acc_t>(plane[h * width + w]);
          if (v > best) {
            best = v;
            best_index = h * width + w;
          }
        }
      }
    }
    out[idx] = static_cast<scalar_t>(best);
    if constexpr (kWriteArgmax) argmax[idx] = best_index;
  }
}

// Where the backward's terms go. FloatAtomicPlanes: float atomics into acc_t planes. FixedPointPlanes: fixed-point
// int64 sums and non-finite flags (common/fixed_point.h), its scale read from the device by bind(), once a thread.
template <typename acc_t>
struct FloatAtomicPlanes {
  acc_t* data;
  __device__ FloatAtomicPlanes bind() const { return *this; }
  __device__ void operator()(int64_t i, acc_t term) const { atomicAdd(data + i, term); }
};

struct FixedPointPlanes {
  int64_t* sums;
  int32_t* flags;
  const double* max_abs;
  int64_t terms;
  FixedPointScale scale;
  __device__ FixedPointPlanes bind() const {
    FixedPointPlanes t = *this;
    t.scale = fixed_point_scale(*max_abs, terms);
    return t;
  }
  __device__ void operator()(int64_t i, double term) const { fixed_point_atomic_add(sums + i, flags + i, term, scale); }
};

// One thread per output element: its gradient added at its argmax.
template <typename scalar_t, typename acc_t, typename Target>
__global__ void roi_pool_backward_kernel(int64_t total, const scalar_t* __restrict__ grad,
                                         const int64_t* __restrict__ argmax, const acc_t* __restrict__ rois,
                                         int64_t batch, int64_t channels, int64_t plane_size, int64_t bins,
                                         Target target_in) {
  const Target target = target_in.bind();
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t c = (idx / bins) % channels;
    const int64_t r = idx / (bins * channels);
    const acc_t b = rois[5 * r];
    const bool batch_ok = b >= 0 && b < static_cast<acc_t>(batch);
    CUDA_KERNEL_ASSERT(batch_ok && "roi_pool backward: a RoI's batch index is outside [0, N)");
    const int64_t a = argmax[idx];
    if (!batch_ok || a < 0 || a >= plane_size) continue;
    target((static_cast<int64_t>(b) * channels + c) * plane_size + a, static_cast<acc_t>(grad[idx]));
  }
}

// The forward's values and, with write_argmax, the argmax of each bin (an empty tensor otherwise).
std::tuple<at::Tensor, at::Tensor> roi_pool_forward_impl(const at::Tensor& input_in, const at::Tensor& rois_in,
                                                         double spatial_scale, int64_t pooled_height,
                                                         int64_t pooled_width, bool write_argmax) {
  check_roi_inputs(input_in, rois_in, spatial_scale, pooled_height, pooled_width, "roi_pool");
  const c10::cuda::CUDAGuard guard(input_in.device());
  const at::Tensor input = input_in.contiguous();
  const at::Tensor rois = rois_in.to(at::toOpMathType(input.scalar_type())).contiguous();
  const int64_t k = rois.size(0), channels = input.size(1);
  at::Tensor out = at::empty({k, channels, pooled_height, pooled_width}, input.options());
  at::Tensor argmax = write_argmax ? at::empty({k, channels, pooled_height, pooled_width},
                                               input.options().dtype(at::kLong))
                                   : at::empty({0}, input.options().dtype(at::kLong));
  const int64_t total = out.numel();
  if (total == 0) return {out, argmax};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_pool_forward_cuda", [&] {
    const auto launch = [&](auto kernel) {
      kernel<<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          total, input.data_ptr<scalar_t>(), rois.data_ptr<at::opmath_type<scalar_t>>(), input.size(0), channels,
          input.size(2),
          input.size(3), pooled_height, pooled_width, static_cast<at::opmath_type<scalar_t>>(spatial_scale),
          out.data_ptr<scalar_t>(), write_argmax ? argmax.data_ptr<int64_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (write_argmax) {
      launch(roi_pool_forward_kernel<scalar_t, true>);
    } else {
      launch(roi_pool_forward_kernel<scalar_t, false>);
    }
  });
  return {out, argmax};
}

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cuda(const at::Tensor& input, const at::Tensor& rois,
                                                         double spatial_scale, int64_t pooled_height,
                                                         int64_t pooled_width) {
  return roi_pool_forward_impl(input, rois, spatial_scale, pooled_height, pooled_width, /*write_argmax=*/true);
}

// The inference op: the forward's values, without writing the argmax.
at::Tensor roi_pool_values_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                int64_t pooled_height, int64_t pooled_width) {
  return std::get<0>(
      roi_pool_forward_impl(input, rois, spatial_scale, pooled_height, pooled_width, /*write_argmax=*/false));
}

// The backward's inputs, checked, contiguous, the argmax as int64 and the RoIs in the gradient's math type.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_inputs(const at::Tensor& grad, const at::Tensor& rois,
                                                               const at::Tensor& argmax, int64_t channels,
                                                               int64_t pooled_height, int64_t pooled_width) {
  check_pool_grad(grad, rois.size(0), channels, pooled_height, pooled_width, "roi_pool backward");
  check_same_shape(grad, "grad", argmax, "argmax", "roi_pool backward");
  return {grad.contiguous(), argmax.to(at::kLong).contiguous(),
          rois.to(at::toOpMathType(grad.scalar_type())).contiguous()};
}

// Deterministic: fixed-point sums (the private op _roi_pool_backward_fixed_point).
at::Tensor roi_pool_backward_fixed_point_cuda(const at::Tensor& grad_in, const at::Tensor& rois_in,
                                              const at::Tensor& argmax_in, double spatial_scale, int64_t pooled_height,
                                              int64_t pooled_width, int64_t batch_size, int64_t channels,
                                              int64_t height, int64_t width) {
  const c10::cuda::CUDAGuard guard(grad_in.device());
  at::Tensor grad, argmax, rois;
  std::tie(grad, argmax, rois) = backward_inputs(grad_in, rois_in, argmax_in, channels, pooled_height, pooled_width);
  const FixedPointSums planes(at::IntArrayRef{batch_size, channels, height, width}, grad.options());
  const int64_t total = grad.numel(), bins = pooled_height * pooled_width;
  const int64_t terms = std::max<int64_t>(1, rois.size(0) * bins);  // each bin's gradient goes to one element
  const at::Tensor max_abs = fixed_point_max_abs(grad);
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_pool_backward_fp_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (total > 0) {
      const FixedPointPlanes target{planes.sums.data_ptr<int64_t>(), planes.flags.data_ptr<int32_t>(),
                                    max_abs.data_ptr<double>(), terms, FixedPointScale{}};
      roi_pool_backward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          total, grad.data_ptr<scalar_t>(), argmax.data_ptr<int64_t>(), rois.data_ptr<acc_t>(), batch_size,
          channels, height * width, bins, target);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    result = fixed_point_values<scalar_t>(planes, max_abs, terms);
  });
  return result;
}

at::Tensor roi_pool_backward_cuda(const at::Tensor& grad_in, const at::Tensor& rois_in, const at::Tensor& argmax_in,
                                  double spatial_scale, int64_t pooled_height, int64_t pooled_width,
                                  int64_t batch_size, int64_t channels, int64_t height, int64_t width) {
  if (at::globalContext().deterministicAlgorithms()) {
    return roi_pool_backward_fixed_point_cuda(grad_in, rois_in, argmax_in, spatial_scale, pooled_height,
                                              pooled_width, batch_size, channels, height, width);
  }
  const c10::cuda::CUDAGuard guard(grad_in.device());
  at::Tensor grad, argmax, rois;
  std::tie(grad, argmax, rois) = backward_inputs(grad_in, rois_in, argmax_in, channels, pooled_height, pooled_width);
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor acc = at::zeros({batch_size, channels, height, width},
                               grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const int64_t total = grad.numel(), bins = pooled_height * pooled_width, plane = height * width;
    if (total > 0) {
      roi_pool_backward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          total, grad.data_ptr<scalar_t>(), argmax.data_ptr<int64_t>(), rois.data_ptr<acc_t>(), batch_size,
          channels, plane, bins, FloatAtomicPlanes<acc_t>{acc.data_ptr<acc_t>()});
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    result = acc.to(grad.scalar_type());
  });
  return result;
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, CUDA, m) {
  m.impl("roi_pool", &fasterrcnn_ext::roi_pool_forward_cuda);
  m.impl("_roi_pool_values", &fasterrcnn_ext::roi_pool_values_cuda);
  m.impl("_roi_pool_backward", &fasterrcnn_ext::roi_pool_backward_cuda);
  m.impl("_roi_pool_backward_fixed_point", &fasterrcnn_ext::roi_pool_backward_fixed_point_cuda);
}

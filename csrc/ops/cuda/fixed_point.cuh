// The CUDA side of the fixed-point deterministic sums (common/fixed_point.h): the per-element sums and flags,
// the atomic add of one term, and the conversion back, with the scale read from the device (no host sync).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>

#include "ops/common/fixed_point.h"

namespace fasterrcnn_ext {

// The sums and flags of one gradient tensor of `sizes`.
struct FixedPointSums {
  at::Tensor sums, flags;

  FixedPointSums(at::IntArrayRef sizes, const at::TensorOptions& options)
      : sums(at::zeros(sizes, options.dtype(at::kLong))), flags(at::zeros(sizes, options.dtype(at::kInt))) {}
};

// Adds one term to its sum: in fixed point by an integer atomic (two's complement: signed sums wrap correctly), or,
// non-finite, as its flag.
__device__ __forceinline__ void fixed_point_atomic_add(int64_t* sum, int32_t* flags, double term,
                                                       const FixedPointScale& s) {
  if (const int32_t flag = fixed_point_flag(term)) {
    atomicOr(flags, flag);
  } else {
    atomicAdd(reinterpret_cast<unsigned long long*>(sum), static_cast<unsigned long long>(fixed_point_term(term, s)));
  }
}

template <typename scalar_t>
__global__ void fixed_point_values_kernel(int64_t n, const int64_t* __restrict__ sums,
                                          const int32_t* __restrict__ flags, const double* __restrict__ max_abs,
                                          int64_t terms, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const FixedPointScale s = fixed_point_scale(*max_abs, terms);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(fixed_point_value(sums[i], flags[i], s)));
  }
}

// The sums as values of `dtype`.
template <typename scalar_t>
at::Tensor fixed_point_values(const FixedPointSums& b, const at::Tensor& max_abs, int64_t terms) {
  at::Tensor out = at::empty(b.sums.sizes(), b.sums.options().dtype(c10::CppTypeToScalarType<scalar_t>::value));
  const int64_t n = out.numel();
  if (n == 0) return out;
  constexpr int kThreads = 256;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 20));
  fixed_point_values_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      n, b.sums.data_ptr<int64_t>(), b.flags.data_ptr<int32_t>(), max_abs.data_ptr<double>(), terms,
      out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace fasterrcnn_ext

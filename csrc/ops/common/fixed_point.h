// Deterministic parallel sums: every term is rounded to a fixed-point int64 (term * 2^k) and added with integer
// atomics, which are associative, so the sum has the same bits whatever order the threads add in. The CUDA
// backward of RoIAlign and RoIPool under torch.use_deterministic_algorithms(True) scatters this way, with a thread
// per output element as the atomic backward does (cuda/roi_align_kernel.cu, cuda/roi_pool_kernel.cu); their CPU
// twins, the private ops _roi_align_backward_fixed_point and _roi_pool_backward_fixed_point
// (cpu/roi_backward_fixed_point_kernel.cpp), run the same steps serially, so the CPU tests cover them.
//
// The scale 2^k is chosen per call from the largest finite |term| and a bound on how many terms' magnitudes can
// add up in one sum: |sum| * 2^k <= 2^kFixedPointSumBits, and with the rounding of every term (half a unit each)
// the int64 never overflows. Precision: each term is exact to max|term| * terms * 2^-61, far finer than float32's
// 2^-24 of the largest term.
// Non-finite terms cannot be fixed-point: each sets a flag bit (+inf, -inf, NaN) of its sum instead, ORed, also
// associative; the sum is then what float addition gives in any order (NaN if a NaN or both infinities came,
// else the infinity).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace fasterrcnn_ext {

// |sum| * 2^k stays below 2^61: int64 holds 2^63, which leaves room for the half-unit rounding of up to 2^62 terms.
constexpr int kFixedPointSumBits = 61;
// k is kept within [-1000, 1000] so that 2^k and 2^-k are normal doubles (float64 terms near 1e±300).
constexpr int kFixedPointMaxExponent = 1000;

enum FixedPointFlag : int32_t { kFixedPointPosInf = 1, kFixedPointNegInf = 2, kFixedPointNaN = 4 };

struct FixedPointScale {
  double to_fixed;    // 2^k
  double from_fixed;  // 2^-k
};

// The scale of sums of terms whose largest finite magnitude is max_abs, where the magnitudes adding up in one sum
// total at most max_abs * terms (terms >= 1).
FRCNN_INLINE FixedPointScale fixed_point_scale(double max_abs, int64_t terms) {
  int k = 0;
  if (max_abs > 0 && max_abs <= 1.7976931348623157e308) {
    int e = 0;
    frexp(max_abs, &e);  // max_abs < 2^e
    int t = 0;           // terms <= 2^t
    while (t < 63 && (int64_t{1} << t) < terms) ++t;
    k = kFixedPointSumBits - e - t;
    if (k > kFixedPointMaxExponent) k = kFixedPointMaxExponent;
    if (k < -kFixedPointMaxExponent) k = -kFixedPointMaxExponent;
  }
  return FixedPointScale{ldexp(1.0, k), ldexp(1.0, -k)};
}

// A finite term in fixed point, rounded to nearest.
FRCNN_INLINE int64_t fixed_point_term(double term, const FixedPointScale& s) {
  return static_cast<int64_t>(llrint(term * s.to_fixed));
}

// The flag of a non-finite term (0 for a finite one).
FRCNN_INLINE int32_t fixed_point_flag(double term) {
  if (term != term) return kFixedPointNaN;
  if (term == INFINITY) return kFixedPointPosInf;
  if (term == -INFINITY) return kFixedPointNegInf;
  return 0;
}

// The sum back as a double, from its fixed-point value and its flags.
FRCNN_INLINE double fixed_point_value(int64_t sum, int32_t flags, const FixedPointScale& s) {
  if (flags == 0) return static_cast<double>(sum) * s.from_fixed;
  if ((flags & kFixedPointNaN) || (flags & (kFixedPointPosInf | kFixedPointNegInf)) ==
                                      (kFixedPointPosInf | kFixedPointNegInf)) {
    return NAN;
  }
  return (flags & kFixedPointPosInf) ? INFINITY : -INFINITY;
}

// Host: the largest finite |grad| as a float64 scalar on grad's device, the scale's input (no host read; 0 for an
// empty grad).
inline at::Tensor fixed_point_max_abs(const at::Tensor& grad) {
  if (grad.numel() == 0) return at::zeros({}, grad.options().dtype(at::kDouble));
  return at::nan_to_num(grad.abs(), 0.0, 0.0, 0.0).amax().to(at::kDouble);
}

}  // namespace fasterrcnn_ext

// CPU kernels of the private ops _roi_align_backward_fixed_point and _roi_pool_backward_fixed_point: the CUDA
// deterministic backward (common/fixed_point.h) run serially, term by term as the CUDA threads add them, so the CPU
// tests check its scale, rounding and non-finite flags against float64 references and check that the result does
// not depend on the order of the terms. Not a fast path: the CPU's own backward is deterministic already.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/common/checks.h"
#include "ops/common/fixed_point.h"
#include "ops/common/roi_align_per_element.h"

namespace fasterrcnn_ext {
namespace {

// One gradient plane set: the fixed-point sums and the non-finite flags of every element.
struct FixedPointPlanes {
  at::Tensor sums, flags;
  int64_t* sum;
  int32_t* flag;
  FixedPointPlanes(int64_t n, int64_t c, int64_t h, int64_t w, const at::TensorOptions& options)
      : sums(at::zeros({n, c, h, w}, options.dtype(at::kLong))),
        flags(at::zeros({n, c, h, w}, options.dtype(at::kInt))),
        sum(sums.data_ptr<int64_t>()),
        flag(flags.data_ptr<int32_t>()) {}

  void add(int64_t offset, double term, const FixedPointScale& s) {
    if (const int32_t f = fixed_point_flag(term)) {
      flag[offset] |= f;
    } else {
      sum[offset] += fixed_point_term(term, s);
    }
  }

  at::Tensor values(const FixedPointScale& s, at::ScalarType dtype) const {
    at::Tensor out = at::empty(sums.sizes(), sums.options().dtype(at::kDouble));
    double* o = out.data_ptr<double>();
    for (int64_t i = 0; i < out.numel(); ++i) o[i] = fixed_point_value(sum[i], flag[i], s);
    return out.to(dtype);
  }
};

std::vector<at::Tensor> roi_align_backward_fixed_point_cpu(const at::Tensor& grad_in, const at::Tensor& rois_in,
                                                           at::ArrayRef<double> scales, int64_t pooled_height,
                                                           int64_t pooled_width, int64_t sampling_ratio, bool aligned,
                                                           double canonical_scale, double canonical_level,
                                                           int64_t batch_size, int64_t channels,
                                                           at::IntArrayRef heights, at::IntArrayRef widths) {
  const char* op = "_roi_align_backward_fixed_point";
  check_level_shapes(scales, heights, widths);
  check_pool_grad(grad_in, rois_in.size(0), channels, pooled_height, pooled_width, op);
  const at::Tensor grad = grad_in.contiguous(), rois = rois_in.contiguous();
  const RoIAlignParams pp{pooled_height, pooled_width, sampling_ratio, batch_size, channels, rois.size(0), aligned,
                          static_cast<float>(canonical_scale), static_cast<float>(canonical_level)};
  const int64_t bins = pooled_height * pooled_width;
  const FixedPointScale s =
      fixed_point_scale(fixed_point_max_abs(grad).item<double>(), std::max<int64_t>(1, pp.num_rois * bins));
  std::vector<FixedPointPlanes> planes;
  std::vector<int64_t*> unused;
  for (size_t l = 0; l < heights.size(); ++l) {
    planes.emplace_back(batch_size, channels, heights[l], widths[l], grad.options());
    unused.push_back(nullptr);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fixed_point_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const RoIAlignLevels<int64_t> lv = make_roi_align_levels(unused, heights, widths, scales, op);
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const at::Tensor rois_acc = rois.to(c10::CppTypeToScalarType<acc_t>::value);
    const acc_t* roi = rois_acc.data_ptr<acc_t>();
    for (int64_t r = 0; r < pp.num_rois; ++r) {
      const RoIAlignTask<acc_t> task = roi_align_task(lv, pp, roi + 5 * r);
      if (!task.valid) check_roi_batch_index(roi[5 * r], r, batch_size, op);
      const int64_t height = lv.height[task.level], width = lv.width[task.level];
      FixedPointPlanes& level = planes[task.level];
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t plane = (task.image * channels + c) * height * width;
        for (int64_t b = 0; b < bins; ++b) {
          roi_align_scatter_bin(task.g, height, width, b / pooled_width, b % pooled_width,
                                static_cast<acc_t>(g[(r * channels + c) * bins + b]),
                                [&](int64_t offset, acc_t term) { level.add(plane + offset, term, s); });
        }
      }
    }
  });
  std::vector<at::Tensor> result;
  for (const FixedPointPlanes& level : planes) result.push_back(level.values(s, grad.scalar_type()));
  return result;
}

at::Tensor roi_pool_backward_fixed_point_cpu(const at::Tensor& grad_in, const at::Tensor& rois_in,
                                             const at::Tensor& argmax_in, double spatial_scale, int64_t pooled_height,
                                             int64_t pooled_width, int64_t batch_size, int64_t channels,
                                             int64_t height, int64_t width) {
  const char* op = "_roi_pool_backward_fixed_point";
  const int64_t k = rois_in.size(0);
  check_pool_grad(grad_in, k, channels, pooled_height, pooled_width, op);
  check_same_shape(grad_in, "grad", argmax_in, "argmax", op);
  const at::Tensor grad = grad_in.contiguous(), argmax = argmax_in.to(at::kLong).contiguous();
  const at::Tensor rois = rois_in.to(at::kDouble).contiguous();
  const int64_t bins = pooled_height * pooled_width, plane = height * width;
  const FixedPointScale s =
      fixed_point_scale(fixed_point_max_abs(grad).item<double>(), std::max<int64_t>(1, k * bins));
  FixedPointPlanes planes(batch_size, channels, height, width, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fixed_point_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const int64_t* a = argmax.data_ptr<int64_t>();
    const double* roi = rois.data_ptr<double>();
    for (int64_t r = 0; r < k; ++r) {
      check_roi_batch_index(roi[5 * r], r, batch_size, op);
      const int64_t image = static_cast<int64_t>(roi[5 * r]);
      for (int64_t o = r * channels * bins; o < (r + 1) * channels * bins; ++o) {
        // An empty bin has argmax -1 and no gradient; an index outside the plane is bad input, not a write.
        if (a[o] < 0 || a[o] >= plane) continue;
        const int64_t c = (o / bins) % channels;
        planes.add((image * channels + c) * plane + a[o], static_cast<acc_t>(g[o]), s);
      }
    }
  });
  return planes.values(s, grad.scalar_type());
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, CPU, m) {
  m.impl("_roi_align_backward_fixed_point", &fasterrcnn_ext::roi_align_backward_fixed_point_cpu);
  m.impl("_roi_pool_backward_fixed_point", &fasterrcnn_ext::roi_pool_backward_fixed_point_cpu);
}

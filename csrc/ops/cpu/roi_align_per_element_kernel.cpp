// CPU kernel of the private op _roi_align_per_element: the CUDA RoIAlign forward's steps
// (common/roi_align_per_element.h) run on the CPU, one RoI at a time as one CUDA block pools it, so the CPU tests
// check them against torchvision and against roi_align. Not a fast path: roi_align_kernel.cpp is the CPU's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops/common/checks.h"
#include "ops/common/roi_align_per_element.h"

namespace fasterrcnn_ext {
namespace {

template <typename scalar_t>
void pool_per_element(const std::vector<at::Tensor>& features, at::ArrayRef<double> scales, const at::Tensor& rois,
                      const RoIAlignParams& pp, int64_t table_bytes, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<const scalar_t*> data;
  std::vector<int64_t> heights, widths;
  for (const at::Tensor& f : features) {
    data.push_back(f.data_ptr<scalar_t>());
    heights.push_back(f.size(2));
    widths.push_back(f.size(3));
  }
  const RoIAlignLevels<const scalar_t> lv =
      make_roi_align_levels(data, heights, widths, scales, "_roi_align_per_element");
  const at::Tensor rois_acc = rois.to(c10::CppTypeToScalarType<acc_t>::value);  // float32 RoIs of a half map: as is
  const acc_t* roi_data = rois_acc.data_ptr<acc_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t bins = pp.pooled_h * pp.pooled_w;
  at::parallel_for(0, pp.num_rois, 1, [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> table_storage;  // int64 words: the table's 8-byte alignment
    for (int64_t r = lo; r < hi; ++r) {
      acc_t roi[5];
      for (int i = 0; i < 5; ++i) roi[i] = roi_data[5 * r + i];
      const RoIAlignTask<acc_t> task = roi_align_task(lv, pp, roi);
      if (!task.valid) check_roi_batch_index(roi[0], r, pp.batch, "_roi_align_per_element");
      const int64_t height = lv.height[task.level], width = lv.width[task.level];
      const int64_t needed = roi_align_table_bytes(task.g, pp.pooled_h, pp.pooled_w);
      const bool use_table = needed <= table_bytes;
      RoIAlignTable<acc_t> table{};
      if (use_table) {
        table_storage.resize((needed + 7) / 8);
        table = roi_align_table_view(table_storage.data(), task.g, pp.pooled_h, pp.pooled_w);
        for (int64_t i = 0; i < pp.pooled_h + pp.pooled_w; ++i) {
          roi_align_table_fill(table, task.g, i, pp.pooled_h, height, width);
        }
      }
      const scalar_t* image = lv.data[task.level] + task.image * pp.channels * height * width;
      for (int64_t e = 0; e < pp.channels * bins; ++e) {
        const int64_t c = e / bins, p = (e % bins) / pp.pooled_w, q = e % pp.pooled_w;
        const scalar_t* plane = image + c * height * width;
        const acc_t v = use_table ? roi_align_table_bin(table, task.g, plane, width, p, q)
                                  : roi_align_direct_bin(task.g, plane, height, width, p, q);
        o[r * pp.channels * bins + e] = static_cast<scalar_t>(v);
      }
    }
  });
}

at::Tensor roi_align_per_element_cpu(at::TensorList features_in, const at::Tensor& rois_in,
                                     at::ArrayRef<double> scales, int64_t pooled_height, int64_t pooled_width,
                                     int64_t sampling_ratio, bool aligned, double canonical_scale,
                                     double canonical_level, int64_t table_bytes) {
  check_roi_align_per_element_inputs(features_in, rois_in, scales, pooled_height, pooled_width, table_bytes);
  std::vector<at::Tensor> features;
  for (const at::Tensor& f : features_in) features.push_back(f.contiguous());
  const at::Tensor rois = rois_in.contiguous();
  const RoIAlignParams pp{pooled_height,      pooled_width,         sampling_ratio, features[0].size(0),
                          features[0].size(1), rois.size(0),        aligned,        static_cast<float>(canonical_scale),
                          static_cast<float>(canonical_level)};
  at::Tensor out = at::empty({pp.num_rois, pp.channels, pooled_height, pooled_width}, features[0].options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "_roi_align_per_element", [&] {
    pool_per_element<scalar_t>(features, scales, rois, pp, table_bytes, out);
  });
  return out;
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, CPU, m) {
  m.impl("_roi_align_per_element", &fasterrcnn_ext::roi_align_per_element_cpu);
}

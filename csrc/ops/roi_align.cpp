// Schemas of RoIAlign and the fused multi-level RoIAlign. Kernels: cpu/roi_align_kernel.cpp,
// cuda/roi_align_kernel.cu; autocast: autocast/autocast_kernels.cpp.
// _roi_align_per_element: cpu/roi_align_per_element_kernel.cpp, cuda/roi_align_kernel.cu.
// _roi_align_backward_fixed_point: cpu/roi_backward_fixed_point_kernel.cpp, cuda/roi_align_kernel.cu.
#include <torch/library.h>

#include <string>

#include "ops/common/constants.h"

TORCH_LIBRARY_FRAGMENT(fasterrcnn_ext, m) {
  // torchvision::roi_align's schema and argument order. rois: [K, 5] (batch index, x1, y1, x2, y2).
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
      "int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, "
      "bool aligned) -> Tensor");
  // One pass over all RoIs of an FPN: each RoI is pooled from the level
  // floor(canonical_level + log2(sqrt(area) / canonical_scale) + kFpnLevelEps), clamped to the levels given.
  // scales[l] is the spatial scale of features[l] (a power of 2, finest level first). The defaults are
  // common/constants.h's kCanonicalScale and kCanonicalLevel, written into the schema as text.
  const std::string multi_scale_schema =
      "multi_scale_roi_align(Tensor[] features, Tensor rois, float[] scales, SymInt pooled_height, "
      "SymInt pooled_width, int sampling_ratio, bool aligned, float canonical_scale=" +
      std::to_string(fasterrcnn_ext::kCanonicalScale) +
      ", float canonical_level=" + std::to_string(fasterrcnn_ext::kCanonicalLevel) + ") -> Tensor";
  m.def(multi_scale_schema.c_str());
  m.def(
      "_multi_scale_roi_align_backward(Tensor grad, Tensor rois, float[] scales, SymInt pooled_height, "
      "SymInt pooled_width, int sampling_ratio, bool aligned, float canonical_scale, float canonical_level, "
      "SymInt batch_size, SymInt channels, SymInt[] heights, SymInt[] widths) -> Tensor[]");
  // Private: the CUDA forward's steps (common/roi_align_per_element.h) on any device; on the CPU they run serially,
  // so the CPU tests cover them. multi_scale_roi_align's arguments (one feature map: roi_align), plus table_bytes:
  // a RoI whose sample table needs more bytes is pooled per element without one (0: every RoI; CUDA caps it at the
  // kernel's shared memory).
  m.def(
      "_roi_align_per_element(Tensor[] features, Tensor rois, float[] scales, SymInt pooled_height, "
      "SymInt pooled_width, int sampling_ratio, bool aligned, float canonical_scale, float canonical_level, "
      "int table_bytes) -> Tensor");
  // Private: the CUDA backward under torch.use_deterministic_algorithms(True) (fixed-point atomics,
  // common/fixed_point.h) on any device; on the CPU its steps run serially, so the CPU tests cover them.
  // _multi_scale_roi_align_backward's arguments and result (one level: roi_align's backward).
  m.def(
      "_roi_align_backward_fixed_point(Tensor grad, Tensor rois, float[] scales, SymInt pooled_height, "
      "SymInt pooled_width, int sampling_ratio, bool aligned, float canonical_scale, float canonical_level, "
      "SymInt batch_size, SymInt channels, SymInt[] heights, SymInt[] widths) -> Tensor[]");
}

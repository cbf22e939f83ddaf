// QuantizedCPU kernel of nms: torchvision's quantized NMS, for boxes and scores quantized (per-tensor affine) to the
// same dtype, quint8, qint8 or qint32. As torchvision's, it works on the raw integer values: the zero point cancels
// in coordinate differences and the scale in the IoU's ratio (the boxes share one scale), and the scores' order is
// their raw values' order. Boxes are visited by decreasing score, ties in index order (a stable sort), and a box is
// suppressed when its IoU with a kept box, in float32, exceeds iou_threshold.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "ops/common/checks.h"

namespace fasterrcnn_ext {
namespace {

void check_quantized_nms_input(const at::Tensor& t, const char* name) {
  const c10::ScalarType dtype = t.scalar_type();
  FRCNN_CHECK(dtype == at::kQUInt8 || dtype == at::kQInt8 || dtype == at::kQInt32, "nms: quantized ", name,
              " must be quint8, qint8 or qint32, got ", dtype);
  FRCNN_CHECK(t.qscheme() == at::kPerTensorAffine, "nms: quantized ", name,
              " must be quantized per tensor (affine), got another quantization scheme");
}

template <typename q_t>
at::Tensor qnms_typed(const at::Tensor& boxes_in, const at::Tensor& scores_in, double iou_threshold,
                      int64_t max_keep) {
  using raw_t = typename q_t::underlying;
  const at::Tensor boxes_t = boxes_in.contiguous(), scores_t = scores_in.contiguous();
  const raw_t* boxes = reinterpret_cast<const raw_t*>(boxes_t.data_ptr<q_t>());
  const raw_t* scores = reinterpret_cast<const raw_t*>(scores_t.data_ptr<q_t>());
  const int64_t n = boxes_in.size(0);
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return scores[a] > scores[b]; });
  // Areas in raw units, as torchvision: the integer product, then float32 (a degenerate box's is negative).
  std::vector<float> areas(n);
  for (int64_t i = 0; i < n; ++i) {
    const raw_t* b = boxes + 4 * i;
    areas[i] = static_cast<float>((static_cast<int64_t>(b[2]) - b[0]) * (static_cast<int64_t>(b[3]) - b[1]));
  }
  std::vector<char> suppressed(n, 0);
  std::vector<int64_t> keep;
  const int64_t limit = max_keep < 0 ? n : std::min(max_keep, n);
  for (int64_t oi = 0; oi < n && static_cast<int64_t>(keep.size()) < limit; ++oi) {
    const int64_t i = order[oi];
    if (suppressed[i]) continue;
    keep.push_back(i);
    const raw_t* bi = boxes + 4 * i;
    const float ix1 = bi[0], iy1 = bi[1], ix2 = bi[2], iy2 = bi[3], iarea = areas[i];
    for (int64_t oj = oi + 1; oj < n; ++oj) {
      const int64_t j = order[oj];
      if (suppressed[j]) continue;
      const raw_t* bj = boxes + 4 * j;
      const float xx1 = std::max(ix1, static_cast<float>(bj[0])), yy1 = std::max(iy1, static_cast<float>(bj[1]));
      const float xx2 = std::min(ix2, static_cast<float>(bj[2])), yy2 = std::min(iy2, static_cast<float>(bj[3]));
      const float w = std::max(0.0f, xx2 - xx1), h = std::max(0.0f, yy2 - yy1);
      const float inter = w * h;
      const float iou = inter / (iarea + areas[j] - inter);
      if (iou > iou_threshold) suppressed[j] = 1;
    }
  }
  at::Tensor result = at::empty({static_cast<int64_t>(keep.size())}, boxes_in.options().dtype(at::kLong));
  std::copy(keep.begin(), keep.end(), result.data_ptr<int64_t>());
  return result;
}

at::Tensor nms_quantized_cpu(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold,
                             int64_t max_keep) {
  FRCNN_CHECK(dets.dim() == 2 && dets.size(1) == 4, "nms: boxes must be a [N, 4] tensor, got shape ", dets.sizes());
  FRCNN_CHECK(scores.dim() == 1, "nms: scores must be a [N] tensor, got shape ", scores.sizes());
  FRCNN_CHECK(dets.size(0) == scores.size(0), "nms: boxes and scores must have the same length, got ", dets.size(0),
              " boxes and ", scores.size(0), " scores");
  FRCNN_CHECK(dets.is_quantized() && scores.is_quantized() && dets.scalar_type() == scores.scalar_type(),
              "nms: quantized boxes and scores must be quantized to the same dtype, got ", dets.scalar_type(),
              " and ", scores.scalar_type());
  check_quantized_nms_input(dets, "boxes");
  check_quantized_nms_input(scores, "scores");
  check_same_device(dets, "boxes", scores, "scores", "nms");
  at::Tensor result;
  AT_DISPATCH_QINT_TYPES(dets.scalar_type(), "nms_quantized_cpu", [&] {
    result = qnms_typed<scalar_t>(dets, scores, iou_threshold, max_keep);
  });
  return result;
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, QuantizedCPU, m) {
  m.impl("nms", &fasterrcnn_ext::nms_quantized_cpu);
}

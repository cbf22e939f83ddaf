// Autocast for the ops whose inputs must agree in dtype: under torch.autocast a float16/bfloat16 feature map meets
// float32 boxes. As torchvision does, such calls run in float32 and the result comes back in the input's dtype
// (our kernels accumulate half types in float32 anyway; the cast makes mixed dtypes legal and keeps box coordinates
// in float32). Registered for AutocastCPU and AutocastCUDA.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace fasterrcnn_ext {
namespace {

template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor roi_align_autocast(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                              c10::SymInt pooled_height, c10::SymInt pooled_width, int64_t sampling_ratio,
                              bool aligned) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fasterrcnn_ext::roi_align", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, c10::SymInt, c10::SymInt,
                                         int64_t, bool)>();
  return op
      .call(at::autocast::cached_cast(at::kFloat, input, device), at::autocast::cached_cast(at::kFloat, rois, device),
            spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
      .to(input.scalar_type());
}

template <c10::DispatchKey key, c10::DeviceType device>
std::tuple<at::Tensor, at::Tensor> roi_pool_autocast(const at::Tensor& input, const at::Tensor& rois,
                                                     double spatial_scale, c10::SymInt pooled_height,
                                                     c10::SymInt pooled_width) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fasterrcnn_ext::roi_pool", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double, c10::SymInt,
                                                    c10::SymInt)>();
  auto [out, argmax] = op.call(at::autocast::cached_cast(at::kFloat, input, device),
                               at::autocast::cached_cast(at::kFloat, rois, device), spatial_scale, pooled_height,
                               pooled_width);
  return {out.to(input.scalar_type()), argmax};
}

template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor roi_pool_values_autocast(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                    c10::SymInt pooled_height, c10::SymInt pooled_width) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fasterrcnn_ext::_roi_pool_values", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, c10::SymInt, c10::SymInt)>();
  return op
      .call(at::autocast::cached_cast(at::kFloat, input, device), at::autocast::cached_cast(at::kFloat, rois, device),
            spatial_scale, pooled_height, pooled_width)
      .to(input.scalar_type());
}

template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor multi_scale_roi_align_autocast(at::TensorList features, const at::Tensor& rois, at::ArrayRef<double> scales,
                                          c10::SymInt pooled_height, c10::SymInt pooled_width, int64_t sampling_ratio,
                                          bool aligned, double canonical_scale, double canonical_level) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fasterrcnn_ext::multi_scale_roi_align", "")
                       .typed<at::Tensor(at::TensorList, const at::Tensor&, at::ArrayRef<double>, c10::SymInt,
                                         c10::SymInt, int64_t, bool, double, double)>();
  std::vector<at::Tensor> cast;
  for (const at::Tensor& f : features) cast.push_back(at::autocast::cached_cast(at::kFloat, f, device));
  return op
      .call(cast, at::autocast::cached_cast(at::kFloat, rois, device), scales, pooled_height, pooled_width,
            sampling_ratio, aligned, canonical_scale, canonical_level)
      .to(features[0].scalar_type());
}

template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor nms_autocast(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold, int64_t max_keep) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fasterrcnn_ext::nms", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t)>();
  return op.call(at::autocast::cached_cast(at::kFloat, dets, device),
                 at::autocast::cached_cast(at::kFloat, scores, device), iou_threshold, max_keep);
}

template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor batched_nms_autocast(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                                double iou_threshold, int64_t max_keep) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fasterrcnn_ext::batched_nms", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t)>();
  return op.call(at::autocast::cached_cast(at::kFloat, boxes, device),
                 at::autocast::cached_cast(at::kFloat, scores, device), idxs, iou_threshold, max_keep);
}

#define FRCNN_REGISTER_AUTOCAST(KEY, DEVICE)                                                                \
  TORCH_LIBRARY_IMPL(fasterrcnn_ext, KEY, m) {                                                              \
    m.impl("roi_align", TORCH_FN((roi_align_autocast<c10::DispatchKey::KEY, c10::DeviceType::DEVICE>)));    \
    m.impl("roi_pool", TORCH_FN((roi_pool_autocast<c10::DispatchKey::KEY, c10::DeviceType::DEVICE>)));      \
    m.impl("_roi_pool_values",                                                                              \
           TORCH_FN((roi_pool_values_autocast<c10::DispatchKey::KEY, c10::DeviceType::DEVICE>)));          \
    m.impl("multi_scale_roi_align",                                                                         \
           TORCH_FN((multi_scale_roi_align_autocast<c10::DispatchKey::KEY, c10::DeviceType::DEVICE>)));     \
    m.impl("nms", TORCH_FN((nms_autocast<c10::DispatchKey::KEY, c10::DeviceType::DEVICE>)));                \
    m.impl("batched_nms", TORCH_FN((batched_nms_autocast<c10::DispatchKey::KEY, c10::DeviceType::DEVICE>))); \
  }

FRCNN_REGISTER_AUTOCAST(AutocastCPU, CPU)
FRCNN_REGISTER_AUTOCAST(AutocastCUDA, CUDA)

}  // namespace
}  // namespace fasterrcnn_ext

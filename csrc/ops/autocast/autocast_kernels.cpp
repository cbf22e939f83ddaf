// Autocast for the ops whose inputs must agree in dtype: under torch.autocast a float16/bfloat16 feature map meets
// float32 boxes. The RoI ops take that pair as it is (the kernels read the map in its dtype, accumulate in float32
// and return the map's dtype; box coordinates stay float32): only the RoIs are cast to float32, and a map that is
// not float16/bfloat16 (float32, or a pyramid of mixed dtypes) too, as torchvision runs them. NMS runs in float32.
// Registered for AutocastCPU and AutocastCUDA.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace fasterrcnn_ext {
namespace {

bool is_half_type(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// A feature map as the RoI ops take it under autocast: a float16/bfloat16 map as it is, else cast to float32.
template <c10::DeviceType device>
at::Tensor autocast_map(const at::Tensor& input) {
  return is_half_type(input) ? input : at::autocast::cached_cast(at::kFloat, input, device);
}

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
      .call(autocast_map<device>(input), at::autocast::cached_cast(at::kFloat, rois, device), spatial_scale,
            pooled_height, pooled_width, sampling_ratio, aligned)
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
  auto [out, argmax] = op.call(autocast_map<device>(input), at::autocast::cached_cast(at::kFloat, rois, device),
                               spatial_scale, pooled_height, pooled_width);
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
      .call(autocast_map<device>(input), at::autocast::cached_cast(at::kFloat, rois, device), spatial_scale,
            pooled_height, pooled_width)
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
  // A pyramid of one float16/bfloat16 dtype is pooled as it is; any other goes to float32 whole.
  bool one_half_type = !features.empty() && is_half_type(features[0]);
  for (const at::Tensor& f : features) one_half_type = one_half_type && f.scalar_type() == features[0].scalar_type();
  std::vector<at::Tensor> maps;
  for (const at::Tensor& f : features) {
    maps.push_back(one_half_type ? f : at::autocast::cached_cast(at::kFloat, f, device));
  }
  at::Tensor out = op.call(maps, at::autocast::cached_cast(at::kFloat, rois, device), scales, pooled_height,
                           pooled_width, sampling_ratio, aligned, canonical_scale, canonical_level);
  return features.empty() ? out : out.to(features[0].scalar_type());
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

// Device-generic rpn_proposals and detection_postprocess: the whole batch as tensor ops plus one class-aware NMS
// over (image, level) or (image, class) groups. No Python, no loop over images. The NMS returns a keep mask
// (batched_nms_keep_mask), so on CUDA the only host sync of rpn_proposals is the final selection, whose size is the
// output's; detection_postprocess has one more, a candidate selection before the NMS: most of the K x C candidates
// fail the score test, and NMS over all of them costs far more than the sync. The image sizes and per-image counts
// reach the device from pinned memory (host_values_on), which does not wait for it. Registered as
// CompositeExplicitAutograd (what CUDA runs: the CPU has its fused kernel) and as the private _*_generic ops, so the
// CPU tests cover this path too.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "ops/common/checks.h"
#include "ops/common/constants.h"

namespace fasterrcnn_ext {
namespace {

// `values` as an int64 tensor on `options`' device. On an accelerator the copy is made from pinned memory and does
// not block: it is ordered on the current stream and waits for nothing, where a copy from pageable memory
// synchronises with the device (torch's pinned-memory allocator keeps the host buffer until the copy is done).
at::Tensor host_values_on(at::IntArrayRef values, const at::TensorOptions& options) {
  at::Tensor host = at::tensor(values, at::TensorOptions().dtype(at::kLong));
  if (options.device().is_cpu()) return host;
  return host.pin_memory().to(options.device(), /*non_blocking=*/true);
}

at::Tensor batched_nms_keep_mask_op(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                                    double thresh) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fasterrcnn_ext::batched_nms_keep_mask", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(boxes, scores, idxs, thresh);
}

at::Tensor decode_op(const at::Tensor& rel, const at::Tensor& boxes, at::ArrayRef<double> weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fasterrcnn_ext::decode_boxes", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ArrayRef<double>, double)>();
  return op.call(rel, boxes, weights, kBBoxXformClip);
}

// boxes [..., 4] clipped to per-row image sizes hw [..., 2] (height, width), keeping NaN as torch.clamp does.
at::Tensor clip_rows(const at::Tensor& boxes, const at::Tensor& hw) {
  const at::Tensor limit = at::stack({hw.select(-1, 1), hw.select(-1, 0), hw.select(-1, 1), hw.select(-1, 0)}, -1);
  const at::Tensor zero = at::zeros({}, boxes.options());
  return at::where(boxes < 0, zero, at::where(boxes > limit, limit, boxes));
}

at::Tensor large_enough(const at::Tensor& boxes, double min_size) {
  const at::Tensor w = boxes.select(-1, 2) - boxes.select(-1, 0), h = boxes.select(-1, 3) - boxes.select(-1, 1);
  return w.ge(min_size).logical_and(h.ge(min_size));
}

// Of the rows where `selected` (kept by the NMS and valid), the `limit` highest-scoring of each image (all: limit
// < 0), grouped by image in decreasing score (ties: lower row first, as the NMS orders them); and the per-image
// counts. Every step has a size known in advance except the final selection: the one host sync on CUDA.
std::pair<at::Tensor, at::Tensor> first_per_image(const at::Tensor& selected, const at::Tensor& scores,
                                                  const at::Tensor& image_of, int64_t batch, int64_t limit) {
  const auto long_opts = image_of.options();
  // Stable sorts, last key first: score descending (unselected rows, possibly NaN, as -inf), then image.
  const at::Tensor key = at::where(selected, scores, -std::numeric_limits<double>::infinity());
  at::Tensor order = std::get<1>(key.sort(/*stable=*/true, 0, /*descending=*/true));
  order = order.index_select(0, std::get<1>(image_of.index_select(0, order).sort(/*stable=*/true, 0, false)));
  const at::Tensor img = image_of.index_select(0, order);
  const at::Tensor sel = selected.index_select(0, order).to(at::kLong);
  // A selected row's rank in its image: selected rows before it, less those of earlier images.
  const at::Tensor per_image = at::zeros({batch}, long_opts).index_add_(0, img, sel);
  const at::Tensor earlier_images = per_image.cumsum(0) - per_image;
  const at::Tensor rank = sel.cumsum(0) - sel - earlier_images.index_select(0, img);
  const at::Tensor take = limit >= 0 ? sel.to(at::kBool).logical_and(rank.lt(limit)) : sel.to(at::kBool);
  const at::Tensor counts = at::zeros({batch}, long_opts).index_add_(0, img, take.to(at::kLong));
  return {order.masked_select(take), counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rpn_proposals_generic(
    const at::Tensor& objectness, const at::Tensor& deltas, const at::Tensor& anchors,
    at::IntArrayRef num_anchors_per_level, at::IntArrayRef image_sizes, int64_t pre_nms_top_n, int64_t post_nms_top_n,
    double nms_thresh, double score_thresh, double min_size) {
  check_rpn_inputs(objectness, deltas, anchors, num_anchors_per_level, image_sizes);
  const int64_t batch = objectness.size(0), levels = static_cast<int64_t>(num_anchors_per_level.size());
  const auto long_opts = objectness.options().dtype(at::kLong);
  // NaN logits rank last in the top-k, as in the CPU kernel (torch.topk would rank them first).
  const at::Tensor logits = at::where(objectness.isnan(), -std::numeric_limits<double>::infinity(), objectness);
  std::vector<at::Tensor> top, level_ids;
  int64_t begin = 0;
  for (int64_t l = 0; l < levels; ++l) {
    const int64_t count = num_anchors_per_level[l], k = std::min(pre_nms_top_n, count);
    if (k > 0) {
      top.push_back(std::get<1>(logits.slice(1, begin, begin + count).topk(k, 1)) + begin);
      level_ids.push_back(at::full({k}, l, long_opts));
    }
    begin += count;
  }
  if (top.empty()) {
    return {at::empty({0, 4}, objectness.options()), at::empty({0}, objectness.options()), at::zeros({batch}, long_opts)};
  }
  const at::Tensor idx = at::cat(top, 1);  // [N, K]
  const int64_t k = idx.size(1);
  const at::Tensor scores = objectness.gather(1, idx).sigmoid().reshape({-1});
  const at::Tensor rel = deltas.gather(1, idx.unsqueeze(2).expand({batch, k, 4})).reshape({-1, 4});
  const at::Tensor base = anchors.index_select(0, idx.reshape({-1}));
  const at::Tensor image_of = at::arange(batch, long_opts).repeat_interleave(k);
  const at::Tensor hw = host_values_on(image_sizes, long_opts).to(objectness.scalar_type()).view({batch, 2});
  const at::Tensor boxes = clip_rows(decode_op(rel, base, {1.0, 1.0, 1.0, 1.0}), hw.index_select(0, image_of));
  const at::Tensor valid = large_enough(boxes, min_size).logical_and(scores.ge(score_thresh));
  // No selection before the NMS (it would sync): invalid candidates get a NaN score, which ranks after every
  // number, so they can only suppress each other; first_per_image drops them.
  const at::Tensor nms_scores = at::where(valid, scores, std::numeric_limits<double>::quiet_NaN());
  const at::Tensor group = image_of * levels + at::cat(level_ids).repeat({batch});
  const at::Tensor kept = batched_nms_keep_mask_op(boxes, nms_scores, group, nms_thresh);
  const auto [rows, counts] = first_per_image(kept.logical_and(valid), scores, image_of, batch, post_nms_top_n);
  return {boxes.index_select(0, rows), scores.index_select(0, rows), counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> detection_postprocess_generic(
    const at::Tensor& class_logits, const at::Tensor& box_regression, const at::Tensor& proposals,
    at::IntArrayRef boxes_per_image, at::IntArrayRef image_sizes, at::ArrayRef<double> weights, double score_thresh,
    double nms_thresh, int64_t detections_per_img, double min_size) {
  check_detection_inputs(class_logits, box_regression, proposals, boxes_per_image, image_sizes, weights);
  const int64_t batch = static_cast<int64_t>(boxes_per_image.size()), classes = class_logits.size(1);
  const int64_t k = class_logits.size(0);
  const auto long_opts = class_logits.options().dtype(at::kLong);
  const at::Tensor per_image = host_values_on(boxes_per_image, long_opts);
  const at::Tensor proposal_image = at::arange(batch, long_opts).repeat_interleave(per_image, 0, k);
  const at::Tensor hw = host_values_on(image_sizes, long_opts).to(class_logits.scalar_type()).view({batch, 2});
  // Foreground classes only: [K, C - 1] candidates, row-major as torchvision flattens them.
  const at::Tensor scores = class_logits.softmax(-1).slice(1, 1).reshape({-1});
  at::Tensor boxes = decode_op(box_regression, proposals, weights).view({k, classes, 4}).slice(1, 1);
  boxes = clip_rows(boxes, hw.index_select(0, proposal_image).unsqueeze(1)).reshape({-1, 4});
  const at::Tensor labels = at::arange(1, classes, long_opts).repeat({k});
  const at::Tensor image_of = proposal_image.repeat_interleave(classes - 1);
  const at::Tensor valid = scores.gt(score_thresh).logical_and(large_enough(boxes, min_size));
  const at::Tensor candidates = valid.nonzero().squeeze(1);  // host sync (see the top of this file)
  const at::Tensor group = image_of * classes + labels;
  const at::Tensor kept = at::zeros_like(valid).index_copy_(
      0, candidates, batched_nms_keep_mask_op(boxes.index_select(0, candidates), scores.index_select(0, candidates),
                                              group.index_select(0, candidates), nms_thresh));
  const auto [rows, counts] = first_per_image(kept, scores, image_of, batch, detections_per_img);
  return {boxes.index_select(0, rows), scores.index_select(0, rows), labels.index_select(0, rows), counts};
}

std::vector<at::Tensor> split_per_image(at::TensorList values, const at::Tensor& counts) {
  FRCNN_CHECK(counts.dim() == 1 && counts.scalar_type() == at::kLong,
              "split_per_image: counts must be a 1-D int64 tensor, got shape ", counts.sizes(), " and dtype ",
              counts.scalar_type());
  const at::Tensor sizes = counts.to(at::kCPU).contiguous();  // the host read: the outputs' sizes
  const int64_t* size = sizes.data_ptr<int64_t>();
  const int64_t images = sizes.numel();
  int64_t total = 0;
  for (int64_t i = 0; i < images; ++i) {
    FRCNN_CHECK(size[i] >= 0, "split_per_image: counts[", i, "] = ", size[i], " is negative");
    total += size[i];
  }
  std::vector<at::Tensor> parts;
  parts.reserve(values.size() * static_cast<size_t>(images));
  for (size_t v = 0; v < values.size(); ++v) {
    FRCNN_CHECK(values[v].dim() >= 1 && values[v].size(0) == total, "split_per_image: values[", v,
                "] must have sum(counts) = ", total, " rows, got shape ", values[v].sizes());
    int64_t start = 0;
    for (int64_t i = 0; i < images; ++i) {
      parts.push_back(values[v].narrow(0, start, size[i]).clone());
      start += size[i];
    }
  }
  return parts;
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, CompositeExplicitAutograd, m) {
  m.impl("split_per_image", &fasterrcnn_ext::split_per_image);
  m.impl("rpn_proposals", &fasterrcnn_ext::rpn_proposals_generic);
  m.impl("detection_postprocess", &fasterrcnn_ext::detection_postprocess_generic);
  m.impl("_rpn_proposals_generic", &fasterrcnn_ext::rpn_proposals_generic);
  m.impl("_detection_postprocess_generic", &fasterrcnn_ext::detection_postprocess_generic);
}

// Device-generic rpn_proposals and detection_postprocess: the whole batch as tensor ops plus one class-aware NMS
// over (image, level) or (image, class) groups. No Python, no loop over images. The NMS takes every candidate with a
// valid flag (_batched_nms_keep_mask_valid: on CUDA the invalid ones are sorted last and never walked, read on the
// device) and returns a keep mask, so on CUDA the only host sync is the final selection, whose size is the output's.
// The image sizes and per-image counts reach the device from pinned memory (host_values_on), which does not wait for
// it. Registered as CompositeExplicitAutograd (what CUDA runs: the CPU has its fused kernel) and as the private
// _*_generic ops, so the CPU tests cover this path too.
//
// rpn_proposals_padded and detection_postprocess_padded are the same steps with every size fixed in advance: the
// outputs are padded to post_nms_top_n and detections_per_img rows per image, with the counts on the device, and the
// image sizes are written on the device by fills instead of copies. Nothing in them reads the device or copies from
// the host, so a CUDA graph captures them (FasterRCNN.detect_padded, CUDAGraphDetector). The CPU runs its fused
// kernels and pads their results (cpu/postprocess_kernel.cpp); _*_padded_generic run these on the CPU for the tests.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "ops/common/checks.h"

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

at::Tensor keep_mask_of_valid_op(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                                 const at::Tensor& valid, double thresh) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fasterrcnn_ext::_batched_nms_keep_mask_valid", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         double)>();
  return op.call(boxes, scores, idxs, valid, thresh);
}

// `values` as an int64 tensor on `options`' device with no copy from the host: one fill per value (a CUDA graph
// records each fill with its value; the static-size ops are captured for fixed image sizes anyway).
at::Tensor device_values(at::IntArrayRef values, const at::TensorOptions& options) {
  if (options.device().is_cpu()) return at::tensor(values, at::TensorOptions().dtype(at::kLong));
  at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, options.dtype(at::kLong));
  for (size_t i = 0; i < values.size(); ++i) out.select(0, static_cast<int64_t>(i)).fill_(values[i]);
  return out;
}

at::Tensor decode_op(const at::Tensor& rel, const at::Tensor& boxes, at::ArrayRef<double> weights,
                     double bbox_xform_clip) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fasterrcnn_ext::decode_boxes", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ArrayRef<double>, double)>();
  return op.call(rel, boxes, weights, bbox_xform_clip);
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

// first_per_image with static sizes, for rows laid out image by image (`rows` rows each): [batch, limit] row
// indices (the first counts[i] of image i's slots hold its selected rows in the same order; the rest repeat row 0),
// which slots are filled, and the counts. Sizes depend on batch, rows and limit only.
struct PaddedSelection {
  at::Tensor rows, filled, counts;
};

PaddedSelection first_per_image_padded(const at::Tensor& selected, const at::Tensor& scores, int64_t batch,
                                       int64_t rows, int64_t limit) {
  const auto long_opts = scores.options().dtype(at::kLong);
  const at::Tensor key = at::where(selected, scores, -std::numeric_limits<double>::infinity()).view({batch, rows});
  at::Tensor top = std::get<1>(key.sort(/*stable=*/true, 1, /*descending=*/true)).narrow(1, 0, std::min(limit, rows));
  if (top.size(1) < limit) top = at::cat({top, at::zeros({batch, limit - top.size(1)}, long_opts)}, 1);
  const at::Tensor counts = selected.view({batch, rows}).sum(1, false, at::kLong).clamp_max(limit);
  const at::Tensor filled = at::arange(limit, long_opts).unsqueeze(0).lt(counts.unsqueeze(1));
  return {top + at::arange(batch, long_opts).unsqueeze(1) * rows, filled, counts};
}

// `values` [batch * rows, ...] gathered into [batch, limit, ...] at the selection's rows, zero in unfilled slots.
at::Tensor gather_padded(const at::Tensor& values, const PaddedSelection& s) {
  std::vector<int64_t> shape{s.rows.size(0), s.rows.size(1)};
  for (int64_t d = 1; d < values.dim(); ++d) shape.push_back(values.size(d));
  at::Tensor out = values.index_select(0, s.rows.reshape({-1})).view(shape);
  at::Tensor filled = s.filled;
  while (filled.dim() < out.dim()) filled = filled.unsqueeze(-1);
  return at::where(filled, out, at::zeros({}, out.options()));
}

// Rows 0..batch-1, each repeated `rows` times (no host copy: an expanded arange).
at::Tensor image_of_rows(int64_t batch, int64_t rows, const at::TensorOptions& long_opts) {
  return at::arange(batch, long_opts).unsqueeze(1).expand({batch, rows}).reshape({-1});
}

// The RPN's candidates of a batch, image by image (`per_image` rows each): every image's pre_nms_top_n best logits
// of each level, decoded and clipped to its image (hw [N, 2] on the device), with their scores, which of them are
// valid (side and score thresholds) and which the per-(image, level) NMS keeps among the valid ones.
struct RpnCandidates {
  at::Tensor boxes, scores, kept;
  int64_t per_image = 0;
};

RpnCandidates rpn_candidates(const at::Tensor& objectness, const at::Tensor& deltas, const at::Tensor& anchors,
                             at::IntArrayRef num_anchors_per_level, const at::Tensor& hw, int64_t pre_nms_top_n,
                             double nms_thresh, double score_thresh, double min_size, at::ArrayRef<double> weights,
                             double bbox_xform_clip) {
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
  RpnCandidates c;
  if (top.empty()) return c;
  const at::Tensor idx = at::cat(top, 1);  // [N, K]
  const int64_t k = idx.size(1);
  c.per_image = k;
  c.scores = objectness.gather(1, idx).sigmoid().reshape({-1});
  const at::Tensor rel = deltas.gather(1, idx.unsqueeze(2).expand({batch, k, 4})).reshape({-1, 4});
  const at::Tensor base = anchors.index_select(0, idx.reshape({-1}));
  const at::Tensor image_of = image_of_rows(batch, k, long_opts);
  c.boxes = clip_rows(decode_op(rel, base, weights, bbox_xform_clip), hw.index_select(0, image_of));
  const at::Tensor valid = large_enough(c.boxes, min_size).logical_and(c.scores.ge(score_thresh));
  const at::Tensor group = image_of * levels + at::cat(level_ids).repeat({batch});
  c.kept = keep_mask_of_valid_op(c.boxes, c.scores, group, valid, nms_thresh);
  return c;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rpn_proposals_generic(
    const at::Tensor& objectness, const at::Tensor& deltas, const at::Tensor& anchors,
    at::IntArrayRef num_anchors_per_level, at::IntArrayRef image_sizes, int64_t pre_nms_top_n, int64_t post_nms_top_n,
    double nms_thresh, double score_thresh, double min_size, at::ArrayRef<double> weights, double bbox_xform_clip) {
  check_rpn_inputs(objectness, deltas, anchors, num_anchors_per_level, image_sizes, weights);
  const int64_t batch = objectness.size(0);
  const auto long_opts = objectness.options().dtype(at::kLong);
  const at::Tensor hw = host_values_on(image_sizes, long_opts).to(objectness.scalar_type()).view({batch, 2});
  const RpnCandidates c = rpn_candidates(objectness, deltas, anchors, num_anchors_per_level, hw, pre_nms_top_n,
                                         nms_thresh, score_thresh, min_size, weights, bbox_xform_clip);
  if (c.per_image == 0) {
    return {at::empty({0, 4}, objectness.options()), at::empty({0}, objectness.options()), at::zeros({batch}, long_opts)};
  }
  const auto [rows, counts] =
      first_per_image(c.kept, c.scores, image_of_rows(batch, c.per_image, long_opts), batch, post_nms_top_n);
  return {c.boxes.index_select(0, rows), c.scores.index_select(0, rows), counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rpn_proposals_padded(
    const at::Tensor& objectness, const at::Tensor& deltas, const at::Tensor& anchors,
    at::IntArrayRef num_anchors_per_level, at::IntArrayRef image_sizes, int64_t pre_nms_top_n, int64_t post_nms_top_n,
    double nms_thresh, double score_thresh, double min_size, at::ArrayRef<double> weights, double bbox_xform_clip) {
  check_rpn_inputs(objectness, deltas, anchors, num_anchors_per_level, image_sizes, weights);
  FRCNN_CHECK(post_nms_top_n >= 0, "rpn_proposals_padded: post_nms_top_n must be >= 0 (the padded size), got ",
              post_nms_top_n);
  const int64_t batch = objectness.size(0);
  const auto long_opts = objectness.options().dtype(at::kLong);
  const at::Tensor hw = device_values(image_sizes, long_opts).to(objectness.scalar_type()).view({batch, 2});
  const RpnCandidates c = rpn_candidates(objectness, deltas, anchors, num_anchors_per_level, hw, pre_nms_top_n,
                                         nms_thresh, score_thresh, min_size, weights, bbox_xform_clip);
  if (c.per_image == 0 || batch == 0) {
    return {at::zeros({batch, post_nms_top_n, 4}, objectness.options()),
            at::zeros({batch, post_nms_top_n}, objectness.options()), at::zeros({batch}, long_opts)};
  }
  const PaddedSelection s = first_per_image_padded(c.kept, c.scores, batch, c.per_image, post_nms_top_n);
  return {gather_padded(c.boxes, s), gather_padded(c.scores, s), s.counts};
}

// The detector's candidates, proposal by proposal and then class by class (foreground classes only: [K, C - 1] as
// torchvision flattens them): boxes decoded and clipped (hw [N, 2], proposal_image [K] on the device), scores
// (softmax), labels, which are valid (score, side, and proposal_valid when given) and which the per-(image, class)
// NMS keeps among the valid ones.
struct DetectionCandidates {
  at::Tensor boxes, scores, labels, kept, image_of;
};

DetectionCandidates detection_candidates(const at::Tensor& class_logits, const at::Tensor& box_regression,
                                         const at::Tensor& proposals, const at::Tensor& proposal_image,
                                         const at::Tensor* proposal_valid, const at::Tensor& hw,
                                         at::ArrayRef<double> weights, double bbox_xform_clip,
                                         double score_thresh, double nms_thresh, double min_size) {
  const int64_t classes = class_logits.size(1), k = class_logits.size(0);
  const auto long_opts = class_logits.options().dtype(at::kLong);
  DetectionCandidates c;
  c.scores = class_logits.softmax(-1).slice(1, 1).reshape({-1});
  const at::Tensor boxes =
      decode_op(box_regression, proposals, weights, bbox_xform_clip).view({k, classes, 4}).slice(1, 1);
  c.boxes = clip_rows(boxes, hw.index_select(0, proposal_image).unsqueeze(1)).reshape({-1, 4});
  c.labels = at::arange(1, classes, long_opts).repeat({k});
  c.image_of = proposal_image.unsqueeze(1).expand({k, classes - 1}).reshape({-1});
  at::Tensor valid = c.scores.gt(score_thresh).logical_and(large_enough(c.boxes, min_size));
  if (proposal_valid != nullptr) {
    valid = valid.logical_and(proposal_valid->unsqueeze(1).expand({k, classes - 1}).reshape({-1}));
  }
  c.kept = keep_mask_of_valid_op(c.boxes, c.scores, c.image_of * classes + c.labels, valid, nms_thresh);
  return c;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> detection_postprocess_generic(
    const at::Tensor& class_logits, const at::Tensor& box_regression, const at::Tensor& proposals,
    at::IntArrayRef boxes_per_image, at::IntArrayRef image_sizes, at::ArrayRef<double> weights, double score_thresh,
    double nms_thresh, int64_t detections_per_img, double min_size, double bbox_xform_clip) {
  check_detection_inputs(class_logits, box_regression, proposals, boxes_per_image, image_sizes, weights);
  const int64_t batch = static_cast<int64_t>(boxes_per_image.size()), k = class_logits.size(0);
  const auto long_opts = class_logits.options().dtype(at::kLong);
  const at::Tensor per_image = host_values_on(boxes_per_image, long_opts);
  const at::Tensor proposal_image = at::arange(batch, long_opts).repeat_interleave(per_image, 0, k);
  const at::Tensor hw = host_values_on(image_sizes, long_opts).to(class_logits.scalar_type()).view({batch, 2});
  const DetectionCandidates c = detection_candidates(class_logits, box_regression, proposals, proposal_image, nullptr,
                                                     hw, weights, bbox_xform_clip, score_thresh, nms_thresh,
                                                     min_size);
  const auto [rows, counts] = first_per_image(c.kept, c.scores, c.image_of, batch, detections_per_img);
  return {c.boxes.index_select(0, rows), c.scores.index_select(0, rows), c.labels.index_select(0, rows), counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> detection_postprocess_padded(
    const at::Tensor& class_logits, const at::Tensor& box_regression, const at::Tensor& proposals,
    const at::Tensor& proposal_counts, at::IntArrayRef image_sizes, at::ArrayRef<double> weights, double score_thresh,
    double nms_thresh, int64_t detections_per_img, double min_size, double bbox_xform_clip) {
  const int64_t per_image = check_detection_padded_inputs(class_logits, box_regression, proposals, proposal_counts,
                                                          image_sizes, weights, detections_per_img);
  const int64_t batch = static_cast<int64_t>(image_sizes.size()) / 2;
  const auto options = class_logits.options(), long_opts = options.dtype(at::kLong);
  const int64_t classes = class_logits.size(1);
  if (classes <= 1 || per_image == 0) {
    return {at::zeros({batch, detections_per_img, 4}, options), at::zeros({batch, detections_per_img}, options),
            at::zeros({batch, detections_per_img}, long_opts), at::zeros({batch}, long_opts)};
  }
  const at::Tensor proposal_image = image_of_rows(batch, per_image, long_opts);
  // Proposal j of image i is real when j < proposal_counts[i] (rpn_proposals_padded's padding is not); counts are
  // not read on the host, so one outside [0, P] acts as clamped to it.
  const at::Tensor proposal_valid =
      at::arange(per_image, long_opts).repeat({batch}).lt(proposal_counts.index_select(0, proposal_image));
  const at::Tensor hw = device_values(image_sizes, long_opts).to(class_logits.scalar_type()).view({batch, 2});
  const DetectionCandidates c = detection_candidates(class_logits, box_regression, proposals, proposal_image,
                                                     &proposal_valid, hw, weights, bbox_xform_clip, score_thresh,
                                                     nms_thresh, min_size);
  const PaddedSelection s = first_per_image_padded(c.kept, c.scores, batch, per_image * (classes - 1),
                                                   detections_per_img);
  return {gather_padded(c.boxes, s), gather_padded(c.scores, s), gather_padded(c.labels, s), s.counts};
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
  m.impl("rpn_proposals_padded", &fasterrcnn_ext::rpn_proposals_padded);
  m.impl("detection_postprocess_padded", &fasterrcnn_ext::detection_postprocess_padded);
  m.impl("_rpn_proposals_padded_generic", &fasterrcnn_ext::rpn_proposals_padded);
  m.impl("_detection_postprocess_padded_generic", &fasterrcnn_ext::detection_postprocess_padded);
}

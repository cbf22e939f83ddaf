// The argument checks of checks.h, compiled by the C++ compiler for every backend (see checks.h for why).
#include "ops/common/checks.h"

#include <ATen/ATen.h>

#include <cmath>

namespace fasterrcnn_ext {

void check_boxes(const at::Tensor& boxes, const char* op, const char* name) {
  FRCNN_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, op, ": ", name, " must be a [N, 4] tensor, got shape ",
              boxes.sizes());
  FRCNN_CHECK(at::isFloatingType(boxes.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got dtype ", boxes.scalar_type());
}

void check_roi_batch_index(double batch_index, int64_t roi, int64_t batch_size, const char* op) {
  FRCNN_CHECK(batch_index >= 0 && batch_index < static_cast<double>(batch_size), op, ": rois[", roi, ", 0] = ",
              batch_index, " is not a valid batch index: the input has batch size ", batch_size);
}

void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                      const char* op) {
  FRCNN_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", a_name, " and ", b_name,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                       const char* op) {
  FRCNN_CHECK(a.device() == b.device(), op, ": ", a_name, " and ", b_name,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

void check_nms_inputs(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor* idxs,
                      const char* op) {
  check_boxes(boxes, op, "boxes");
  FRCNN_CHECK(scores.dim() == 1, op, ": scores must be a [N] tensor, got shape ", scores.sizes());
  FRCNN_CHECK(boxes.size(0) == scores.size(0), op, ": boxes and scores must have the same length, got ",
              boxes.size(0), " boxes and ", scores.size(0), " scores");
  check_same_dtype(boxes, "boxes", scores, "scores", op);
  check_same_device(boxes, "boxes", scores, "scores", op);
  if (idxs != nullptr) {
    FRCNN_CHECK(idxs->dim() == 1, op, ": idxs must be a [N] tensor, got shape ", idxs->sizes());
    FRCNN_CHECK(idxs->size(0) == boxes.size(0), op, ": idxs and boxes must have the same length, got ",
                idxs->size(0), " idxs and ", boxes.size(0), " boxes");
    FRCNN_CHECK(at::isIntegralType(idxs->scalar_type(), /*includeBool=*/false), op,
                ": idxs must be an integer tensor, got dtype ", idxs->scalar_type());
    check_same_device(boxes, "boxes", *idxs, "idxs", op);
  }
}

void check_nms_chunk_rows(int64_t chunk_rows, int64_t block_boxes, const char* op) {
  FRCNN_CHECK(chunk_rows >= 0 && chunk_rows % block_boxes == 0, op, ": chunk_rows must be 0 or a positive multiple of ",
              block_boxes, ", got ", chunk_rows);
}

void check_nms_valid(const at::Tensor& valid, const at::Tensor& boxes, const char* op) {
  FRCNN_CHECK(valid.dim() == 1 && valid.size(0) == boxes.size(0) && valid.scalar_type() == at::kBool, op,
              ": valid must be a bool [N] tensor with N = ", boxes.size(0), " (one flag per box), got shape ",
              valid.sizes(), " and dtype ", valid.scalar_type());
  check_same_device(boxes, "boxes", valid, "valid", op);
}

int64_t check_detection_padded_inputs(const at::Tensor& class_logits, const at::Tensor& box_regression,
                                      const at::Tensor& proposals, const at::Tensor& proposal_counts,
                                      at::IntArrayRef image_sizes, at::ArrayRef<double> weights,
                                      int64_t detections_per_img) {
  const char* op = "detection_postprocess_padded";
  const int64_t batch = static_cast<int64_t>(image_sizes.size()) / 2, k = class_logits.size(0);
  FRCNN_CHECK(batch > 0 && k % batch == 0, op, ": the proposals must be [N * P, 4] for N = ", batch,
              " images (image_sizes) of P rows each, got ", k, " rows");
  const int64_t per_image = k / batch;
  check_detection_inputs(class_logits, box_regression, proposals, std::vector<int64_t>(batch, per_image),
                         image_sizes, weights);
  FRCNN_CHECK(proposal_counts.dim() == 1 && proposal_counts.size(0) == batch &&
                  proposal_counts.scalar_type() == at::kLong,
              op, ": proposal_counts must be an int64 [N] tensor with N = ", batch, ", got shape ",
              proposal_counts.sizes(), " and dtype ", proposal_counts.scalar_type());
  check_same_device(class_logits, "class_logits", proposal_counts, "proposal_counts", op);
  FRCNN_CHECK(detections_per_img >= 0, op, ": detections_per_img must be >= 0 (the padded size), got ",
              detections_per_img);
  return per_image;
}

void check_roi_dtypes(const at::Tensor& input, const at::Tensor& rois, const char* op) {
  const c10::ScalarType map = input.scalar_type(), coords = rois.scalar_type();
  const bool half_map = map == at::kHalf || map == at::kBFloat16;
  if (half_map) {
    FRCNN_CHECK(coords == map || coords == at::kFloat, op, ": rois must be float32 or have the dtype of input (",
                map, "), got ", coords);
  } else {
    FRCNN_CHECK(coords == map, op, ": input and rois must have the same dtype, got ", map, " and ", coords,
                " (float32 rois go with float32, float16 or bfloat16 input)");
  }
}

void check_roi_inputs(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                      int64_t pooled_height, int64_t pooled_width, const char* op) {
  FRCNN_CHECK(input.dim() == 4, op, ": input must be a [N, C, H, W] tensor, got shape ", input.sizes());
  FRCNN_CHECK(at::isFloatingType(input.scalar_type()), op, ": input must be a floating-point tensor, got dtype ",
              input.scalar_type());
  FRCNN_CHECK(rois.dim() == 2 && rois.size(1) == 5, op,
              ": rois must be a [K, 5] tensor of (batch index, x1, y1, x2, y2), got shape ", rois.sizes());
  check_roi_dtypes(input, rois, op);
  check_same_device(input, "input", rois, "rois", op);
  FRCNN_CHECK(pooled_height > 0 && pooled_width > 0, op, ": output_size must be positive, got (", pooled_height,
              ", ", pooled_width, ")");
  FRCNN_CHECK(spatial_scale > 0, op, ": spatial_scale must be positive, got ", spatial_scale);
}

void check_multi_scale_inputs(at::TensorList features, const at::Tensor& rois, at::ArrayRef<double> scales,
                              int64_t pooled_height, int64_t pooled_width) {
  FRCNN_CHECK(!features.empty(), "multi_scale_roi_align: features must not be empty");
  FRCNN_CHECK(features.size() == scales.size(), "multi_scale_roi_align: got ", features.size(),
              " feature maps but ", scales.size(), " scales");
  for (size_t l = 0; l < features.size(); ++l) {
    check_roi_inputs(features[l], rois, scales[l], pooled_height, pooled_width, "multi_scale_roi_align");
    FRCNN_CHECK(features[l].scalar_type() == features[0].scalar_type(),
                "multi_scale_roi_align: every feature map must have the dtype of features[0] (",
                features[0].scalar_type(), "), but features[", l, "] is ", features[l].scalar_type());
    const double k = -std::log2(scales[l]);
    FRCNN_CHECK(k == std::round(k), "multi_scale_roi_align: scales must be powers of 2, got ", scales);
    FRCNN_CHECK(features[l].size(0) == features[0].size(0) && features[l].size(1) == features[0].size(1),
                "multi_scale_roi_align: every feature map must have the batch size and channels of features[0] ",
                features[0].sizes(), ", but features[", l, "] has shape ", features[l].sizes());
  }
  // As torchvision's LevelMapper: a RoI's level k in [k_min, k_max] (from the first and last scales) reads
  // features[k - k_min], so that range must fit in the feature list.
  const double k_min = -std::log2(scales.front()), k_max = -std::log2(scales.back());
  FRCNN_CHECK(k_min <= k_max && k_max - k_min < static_cast<double>(features.size()),
              "multi_scale_roi_align: the scales must go from fine to coarse with one feature map per level ",
              "between the first and the last, got ", scales);
}

void check_roi_align_per_element_inputs(at::TensorList features, const at::Tensor& rois,
                                        at::ArrayRef<double> scales, int64_t pooled_height, int64_t pooled_width,
                                        int64_t table_bytes) {
  FRCNN_CHECK(!features.empty() && features.size() == scales.size(), "_roi_align_per_element: got ",
              features.size(), " feature maps and ", scales.size(), " scales; one scale per feature map");
  if (features.size() == 1) {
    check_roi_inputs(features[0], rois, scales[0], pooled_height, pooled_width, "_roi_align_per_element");
  } else {
    check_multi_scale_inputs(features, rois, scales, pooled_height, pooled_width);
  }
  FRCNN_CHECK(table_bytes >= 0, "_roi_align_per_element: table_bytes must be >= 0, got ", table_bytes);
}

void check_box_weights(at::ArrayRef<double> weights, const char* op) {
  FRCNN_CHECK(weights.size() == 4, op, ": weights must have 4 values (wx, wy, ww, wh), got ", weights.size(), ": ",
              weights);
}

void check_decode_inputs(const at::Tensor& rel_codes, const at::Tensor& boxes, at::ArrayRef<double> weights) {
  check_box_weights(weights, "decode_boxes");
  check_boxes(boxes, "decode_boxes", "boxes");
  FRCNN_CHECK(rel_codes.dim() == 2 && rel_codes.size(1) % 4 == 0 && rel_codes.size(1) > 0,
              "decode_boxes: rel_codes must be a [N, 4 * C] tensor, got shape ", rel_codes.sizes());
  FRCNN_CHECK(rel_codes.size(0) == boxes.size(0), "decode_boxes: rel_codes and boxes must have the same length, got ",
              rel_codes.size(0), " and ", boxes.size(0));
  check_same_dtype(rel_codes, "rel_codes", boxes, "boxes", "decode_boxes");
  check_same_device(rel_codes, "rel_codes", boxes, "boxes", "decode_boxes");
}

void check_encode_inputs(const at::Tensor& reference, const at::Tensor& proposals,
                         at::ArrayRef<double> weights) {
  check_box_weights(weights, "encode_boxes");
  check_boxes(reference, "encode_boxes", "reference_boxes");
  check_boxes(proposals, "encode_boxes", "proposals");
  FRCNN_CHECK(reference.size(0) == proposals.size(0),
              "encode_boxes: reference_boxes and proposals must have the same length, got ", reference.size(0), " and ",
              proposals.size(0));
  check_same_dtype(reference, "reference_boxes", proposals, "proposals", "encode_boxes");
  check_same_device(reference, "reference_boxes", proposals, "proposals", "encode_boxes");
}

void check_clip_inputs(const at::Tensor& boxes, int64_t height, int64_t width) {
  FRCNN_CHECK(boxes.dim() >= 1 && boxes.size(-1) == 4, "clip_boxes_to_image: boxes must be a [..., 4] tensor, got shape ",
              boxes.sizes());
  FRCNN_CHECK(at::isFloatingType(boxes.scalar_type()),
              "clip_boxes_to_image: boxes must be a floating-point tensor, got dtype ", boxes.scalar_type());
  FRCNN_CHECK(height >= 0 && width >= 0, "clip_boxes_to_image: the image size must be non-negative, got (", height,
              ", ", width, ")");
}

void check_anchor_inputs(at::TensorList cell_anchors, at::IntArrayRef grid_sizes, at::IntArrayRef strides) {
  const size_t levels = cell_anchors.size();
  FRCNN_CHECK(grid_sizes.size() == 2 * levels && strides.size() == 2 * levels, "anchor_grid: got ", levels,
              " levels of cell anchors, so grid_sizes and strides need ", 2 * levels, " values each (h, w per level), got ",
              grid_sizes.size(), " and ", strides.size());
  for (size_t l = 0; l < levels; ++l) {
    FRCNN_CHECK(cell_anchors[l].dim() == 2 && cell_anchors[l].size(1) == 4, "anchor_grid: cell_anchors[", l,
                "] must be a [A, 4] tensor, got shape ", cell_anchors[l].sizes());
    FRCNN_CHECK(cell_anchors[l].scalar_type() == cell_anchors[0].scalar_type() &&
                    cell_anchors[l].device() == cell_anchors[0].device(),
                "anchor_grid: every level's cell anchors must have the dtype and device of level 0");
    FRCNN_CHECK(grid_sizes[2 * l] >= 0 && grid_sizes[2 * l + 1] >= 0, "anchor_grid: grid sizes must be >= 0, got ",
                grid_sizes);
  }
}

void check_rpn_inputs(const at::Tensor& objectness, const at::Tensor& deltas, const at::Tensor& anchors,
                      at::IntArrayRef num_anchors_per_level, at::IntArrayRef image_sizes,
                      at::ArrayRef<double> weights) {
  const char* op = "rpn_proposals";
  FRCNN_CHECK(objectness.dim() == 2, op, ": objectness must be a [N, A] tensor of logits, got shape ",
              objectness.sizes());
  FRCNN_CHECK(deltas.dim() == 3 && deltas.size(2) == 4 && deltas.size(0) == objectness.size(0) &&
                  deltas.size(1) == objectness.size(1),
              op, ": deltas must be [N, A, 4] = [", objectness.size(0), ", ", objectness.size(1),
              ", 4] to match objectness, got ", deltas.sizes());
  FRCNN_CHECK(anchors.dim() == 2 && anchors.size(1) == 4 && anchors.size(0) == objectness.size(1), op,
              ": anchors must be [A, 4] = [", objectness.size(1), ", 4] to match objectness, got ", anchors.sizes());
  check_same_dtype(objectness, "objectness", deltas, "deltas", op);
  check_same_dtype(objectness, "objectness", anchors, "anchors", op);
  FRCNN_CHECK(at::isFloatingType(objectness.scalar_type()), op, ": objectness must be floating point, got ",
              objectness.scalar_type());
  int64_t total = 0;
  for (int64_t n : num_anchors_per_level) {
    FRCNN_CHECK(n >= 0, op, ": num_anchors_per_level must be >= 0, got ", num_anchors_per_level);
    total += n;
  }
  FRCNN_CHECK(total == objectness.size(1), op, ": num_anchors_per_level ", num_anchors_per_level, " sums to ", total,
              " but objectness has ", objectness.size(1), " anchors");
  FRCNN_CHECK(static_cast<int64_t>(image_sizes.size()) == 2 * objectness.size(0), op,
              ": image_sizes must hold (height, width) for each of the ", objectness.size(0), " images, got ",
              image_sizes.size(), " values");
  check_box_weights(weights, op);
}

void check_detection_inputs(const at::Tensor& class_logits, const at::Tensor& box_regression,
                            const at::Tensor& proposals, at::IntArrayRef boxes_per_image,
                            at::IntArrayRef image_sizes, at::ArrayRef<double> weights) {
  const char* op = "detection_postprocess";
  FRCNN_CHECK(class_logits.dim() == 2 && class_logits.size(1) >= 1, op,
              ": class_logits must be a [K, C] tensor, got shape ", class_logits.sizes());
  const int64_t k = class_logits.size(0), c = class_logits.size(1);
  FRCNN_CHECK(box_regression.dim() == 2 && box_regression.size(0) == k && box_regression.size(1) == 4 * c, op,
              ": box_regression must be [K, 4 * C] = [", k, ", ", 4 * c, "] to match class_logits, got ",
              box_regression.sizes());
  FRCNN_CHECK(proposals.dim() == 2 && proposals.size(0) == k && proposals.size(1) == 4, op,
              ": proposals must be [K, 4] = [", k, ", 4] to match class_logits, got ", proposals.sizes());
  check_same_dtype(class_logits, "class_logits", box_regression, "box_regression", op);
  check_same_dtype(class_logits, "class_logits", proposals, "proposals", op);
  check_box_weights(weights, op);
  int64_t total = 0;
  for (int64_t n : boxes_per_image) {
    FRCNN_CHECK(n >= 0, op, ": boxes_per_image must be >= 0, got ", boxes_per_image);
    total += n;
  }
  FRCNN_CHECK(total == k, op, ": boxes_per_image ", boxes_per_image, " sums to ", total, " but there are ", k,
              " proposals");
  FRCNN_CHECK(image_sizes.size() == 2 * boxes_per_image.size(), op,
              ": image_sizes must hold (height, width) for each of the ", boxes_per_image.size(), " images, got ",
              image_sizes.size(), " values");
}

void check_pool_grad(const at::Tensor& grad, int64_t num_rois, int64_t channels, int64_t pooled_height,
                     int64_t pooled_width, const char* op) {
  FRCNN_CHECK(grad.dim() == 4 && grad.size(0) == num_rois && grad.size(1) == channels &&
                  grad.size(2) == pooled_height && grad.size(3) == pooled_width,
              op, ": grad must be [K, C, pooled_height, pooled_width] = [", num_rois, ", ", channels, ", ",
              pooled_height, ", ", pooled_width, "], got ", grad.sizes());
}

void check_level_shapes(at::ArrayRef<double> scales, at::IntArrayRef heights, at::IntArrayRef widths) {
  FRCNN_CHECK(heights.size() == scales.size() && widths.size() == scales.size(),
              "multi_scale_roi_align backward: heights, widths and scales must have the same length, got ",
              heights.size(), ", ", widths.size(), " and ", scales.size());
}

void check_cuda(const at::Tensor& tensor, const char* name, const char* op) {
  FRCNN_CHECK(tensor.is_cuda(), op, ": ", name, " must be a CUDA tensor for the CUDA kernel, got ", tensor.device());
}

void check_same_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                      const char* op) {
  FRCNN_CHECK(a.sizes() == b.sizes(), op, ": ", b_name, " must have the shape of ", a_name, " ", a.sizes(), ", got ",
              b.sizes());
}

void check_num_levels(int64_t levels, int64_t max_levels, const char* op) {
  FRCNN_CHECK(levels <= max_levels, op, ": at most ", max_levels, " feature levels are supported, got ", levels);
}

}  // namespace fasterrcnn_ext

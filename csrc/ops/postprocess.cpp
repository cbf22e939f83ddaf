// Schemas of the fused post-processing ops. Kernels: cpu/postprocess_kernel.cpp (fused, CPU) and
// composite/postprocess.cpp (tensor ops, any device: the CUDA path).
#include <torch/library.h>

#include "ops/common/constants.h"

// Each family's argument list, written once for its four forms (public, padded, and their device-generic twins).
// The decoding arguments trail with torchvision's defaults: `weights` (wx, wy, ww, wh) and `bbox_xform_clip`, the
// upper bound of dw and dh before exp(), both a model's box coder's (RegionProposalNetwork.box_coder: unit weights;
// RoIHeads.box_coder: (10, 10, 5, 5), which the detection ops take without a default as torchvision's RoIHeads).
#define FRCNN_RPN_PROPOSALS_SCHEMA                                                                                   \
  "(Tensor objectness, Tensor deltas, Tensor anchors, SymInt[] num_anchors_per_level, SymInt[] image_sizes, "      \
  "int pre_nms_top_n, int post_nms_top_n, float nms_thresh, float score_thresh, float min_size, "                  \
  "float[] weights=[1., 1., 1., 1.], float bbox_xform_clip=" FRCNN_BBOX_XFORM_CLIP ") -> (Tensor, Tensor, Tensor)"
// per_image: how the proposals split into images ("SymInt[] boxes_per_image" or "Tensor proposal_counts").
#define FRCNN_DETECTION_POSTPROCESS_SCHEMA(per_image)                                                                \
  "(Tensor class_logits, Tensor box_regression, Tensor proposals, " per_image ", SymInt[] image_sizes, "            \
  "float[] weights, float score_thresh, float nms_thresh, int detections_per_img, float min_size=0.01, "           \
  "float bbox_xform_clip=" FRCNN_BBOX_XFORM_CLIP ") -> (Tensor, Tensor, Tensor, Tensor)"

TORCH_LIBRARY_FRAGMENT(fasterrcnn_ext, m) {
  // The proposal selection of torchvision's RegionProposalNetwork (decode, then filter_proposals) for a batch:
  // per image and level, the pre_nms_top_n best logits; their boxes decoded from the anchors (with `weights` and
  // `bbox_xform_clip`), clipped to the image, boxes with a side < min_size and scores (sigmoid) < score_thresh
  // dropped, NMS per level at nms_thresh, the post_nms_top_n best kept.
  //   objectness [N, A] logits, deltas [N, A, 4], anchors [A, 4] (levels concatenated, num_anchors_per_level each),
  //   image_sizes [h0, w0, h1, w1, ...].
  // Returns boxes [K, 4], scores [K] (sigmoid) and counts [N] (int64: the first counts[0] rows are image 0's, ...).
  m.def("rpn_proposals" FRCNN_RPN_PROPOSALS_SCHEMA);
  // torchvision's RoIHeads.postprocess_detections for a batch: softmax over classes, per-class boxes decoded from
  // the proposals with `weights` and `bbox_xform_clip`, clipped, background and scores <= score_thresh and boxes
  // with a side < min_size dropped, NMS per class at nms_thresh, the detections_per_img best kept.
  //   class_logits [K, C], box_regression [K, 4 * C], proposals [K, 4] (boxes_per_image rows per image).
  // Returns boxes [D, 4], scores [D], labels [D] (int64) and counts [N].
  m.def("detection_postprocess" FRCNN_DETECTION_POSTPROCESS_SCHEMA("SymInt[] boxes_per_image"));
  // Each of `values` (tensors of sum(counts) rows) split into one tensor per image, counts[i] rows for image i:
  // [values[0] of image 0, values[0] of image 1, ..., values[1] of image 0, ...]. The per-image sizes are read on
  // the host (one read for all of values), so under torch.compile and torch.export each output gets an unbacked size
  // from the fake kernel instead of a graph break. The outputs are copies, not views.
  m.def("split_per_image(Tensor[] values, Tensor counts) -> Tensor[]");
  // rpn_proposals and detection_postprocess with every output size fixed in advance, for CUDA graphs: no host sync,
  // no copy from the host (composite/postprocess.cpp). The same selection, padded:
  //   rpn_proposals_padded -> boxes [N, post_nms_top_n, 4], scores [N, post_nms_top_n], counts [N]: image i's
  //     proposals are its first counts[i] rows, the rest zeros;
  //   detection_postprocess_padded takes the proposals as [N * P, 4] (P rows per image, proposal_counts [N] of them
  //     real: rpn_proposals_padded's output flattened) -> boxes [N, D, 4], scores [N, D], labels [N, D] (int64),
  //     counts [N], D = detections_per_img, padded with zeros likewise. The CPU checks that proposal_counts are in
  //     [0, P]; CUDA does not read them (that would sync) and clamps.
  m.def("rpn_proposals_padded" FRCNN_RPN_PROPOSALS_SCHEMA);
  m.def("detection_postprocess_padded" FRCNN_DETECTION_POSTPROCESS_SCHEMA("Tensor proposal_counts"));
  // The device-generic implementations (what CUDA runs), callable on any device so the CPU tests cover them; their
  // fake kernels are their public twins' (fasterrcnn_ext/ops/_registration.py, TEST_TWINS).
  m.def("_rpn_proposals_generic" FRCNN_RPN_PROPOSALS_SCHEMA);
  m.def("_detection_postprocess_generic" FRCNN_DETECTION_POSTPROCESS_SCHEMA("SymInt[] boxes_per_image"));
  m.def("_rpn_proposals_padded_generic" FRCNN_RPN_PROPOSALS_SCHEMA);
  m.def("_detection_postprocess_padded_generic" FRCNN_DETECTION_POSTPROCESS_SCHEMA("Tensor proposal_counts"));
}

// Schemas of the box ops and of anchor generation. Kernels: cpu/box_ops_kernel.cpp, cuda/box_ops_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fasterrcnn_ext, m) {
  // [N, 4] x [M, 4] -> [N, M] IoU (float32 for half inputs, as torchvision upcasts).
  m.def("box_iou(Tensor boxes1, Tensor boxes2) -> Tensor");
  // Clamps x to [0, width] and y to [0, height]; boxes [..., 4].
  m.def("clip_boxes_to_image(Tensor boxes, SymInt height, SymInt width) -> Tensor");
  // Indices of the boxes whose sides are both >= min_size.
  m.def("remove_small_boxes(Tensor boxes, float min_size) -> Tensor");
  // BoxCoder.encode_single: regression targets [N, 4] taking proposals to reference_boxes.
  m.def("encode_boxes(Tensor reference_boxes, Tensor proposals, float[] weights) -> Tensor");
  // BoxCoder.decode_single: rel_codes [N, 4 * C] applied to boxes [N, 4] -> [N, 4 * C].
  m.def("decode_boxes(Tensor rel_codes, Tensor boxes, float[] weights, float bbox_xform_clip) -> Tensor");
  // Anchors of every level in one tensor: level l has grid (grid_sizes[2l], grid_sizes[2l+1]) with strides
  // (strides[2l], strides[2l+1]) and cell_anchors[l] ([A_l, 4], centred on 0). Order: level, row, column, anchor.
  m.def("anchor_grid(Tensor[] cell_anchors, SymInt[] grid_sizes, SymInt[] strides) -> Tensor");
}

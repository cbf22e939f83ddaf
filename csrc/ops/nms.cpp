// Schemas of the NMS ops. Kernels: cpu/nms_kernel.cpp, cuda/nms_kernel.cu;
// _nms_bitmask: cpu/nms_bitmask_kernel.cpp, cuda/nms_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fasterrcnn_ext, m) {
  // Same argument order as torchvision::nms, so the two are interchangeable at the torch.ops level.
  // Returns the indices of kept boxes by decreasing score (ties: lower index first; NaN scores last).
  // max_keep >= 0 stops after that many kept boxes: the result is then nms(...)[:max_keep].
  m.def("nms(Tensor dets, Tensor scores, float iou_threshold, *, int max_keep=-1) -> Tensor");
  // Class-aware NMS in one call: boxes only suppress boxes of the same idxs value.
  m.def("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold, *, int max_keep=-1) -> Tensor");
  // batched_nms as a keep mask in input order (bool [N]): a fixed-size output, so on CUDA no host sync (the fused
  // post-processing selects once, at its end).
  m.def("batched_nms_keep_mask(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
  // Private: batched_nms_keep_mask over the boxes where valid (bool [N]) only: the others are neither kept nor
  // suppress any box. On CUDA they cost nothing (sorted last, and the kernels stop at the valid count, read on the
  // device), so the static-size post-processing can hand it every candidate without selecting on the host first.
  m.def(
      "_batched_nms_keep_mask_valid(Tensor boxes, Tensor scores, Tensor idxs, Tensor valid, float iou_threshold) "
      "-> Tensor");
  // Private: the CUDA NMS algorithm (common/nms_bitmask.h) on any device; on the CPU its steps run serially so the CPU
  // tests cover them. idxs None: nms, else batched_nms. chunk_rows > 0 (a multiple of 64) builds the mask that many
  // rows at a time, so tests reach the chunked path with few boxes; 0: the memory budget decides. valid: as in
  // _batched_nms_keep_mask_valid.
  m.def(
      "_nms_bitmask(Tensor boxes, Tensor scores, Tensor? idxs, float iou_threshold, int max_keep, int chunk_rows, "
      "Tensor? valid=None) -> Tensor");
}

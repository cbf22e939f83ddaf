// Schemas of RoIPool. Kernels: cpu/roi_pool_kernel.cpp, cuda/roi_pool_kernel.cu;
// _roi_pool_backward_fixed_point: cpu/roi_backward_fixed_point_kernel.cpp, cuda/roi_pool_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fasterrcnn_ext, m) {
  // torchvision::roi_pool's schema. Returns the pooled output and, for the backward, the argmax of each output
  // element as an index into its (height, width) plane (int64; -1 for an empty bin).
  m.def(
      "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
      "-> (Tensor, Tensor)");
  // The forward without the argmax, for inference (ops.roi_pool calls it when no gradient is needed): the same
  // values, without writing the int64 argmax (twice the output's bytes).
  m.def(
      "_roi_pool_values(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
      "-> Tensor");
  m.def(
      "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor");
  // Private: the CUDA backward under torch.use_deterministic_algorithms(True) (fixed-point atomics,
  // common/fixed_point.h) on any device; on the CPU its steps run serially, so the CPU tests cover them.
  m.def(
      "_roi_pool_backward_fixed_point(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) "
      "-> Tensor");
}

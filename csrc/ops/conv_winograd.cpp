// Schema of the Winograd 3x3 convolution (inference only). Kernel: cpu/conv_winograd_kernel.cpp.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fasterrcnn_ext, m) {
  // A 3x3 convolution, stride 1, padding 1, no dilation or groups, by Winograd's F(4x4, 3x3): input [N, C, H, W],
  // transformed_weight [36, C, K] (fasterrcnn_ext.ops.winograd_weight of a [K, C, 3, 3] weight), bias [K] or None;
  // relu applies max(0, .) to the result. Returns [N, K, H, W] in channels_last memory format.
  m.def("conv3x3_winograd(Tensor input, Tensor transformed_weight, Tensor? bias, bool relu=False) -> Tensor");
}

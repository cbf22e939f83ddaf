// CUDA kernels of the box ops and of anchor generation: one thread per box (or box pair), the box_math.h functions
// of the CPU kernels, int64 indices.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/common/box_math.h"
#include "ops/common/checks.h"

namespace fasterrcnn_ext {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t total) {
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{1} << 20));
}

#define FRCNN_GRID_STRIDE_LOOP(i, n)                                                          \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

template <typename acc_t>
BoxWeights<acc_t> box_weights(at::ArrayRef<double> w) {
  return {static_cast<acc_t>(w[0]), static_cast<acc_t>(w[1]), static_cast<acc_t>(w[2]), static_cast<acc_t>(w[3])};
}

template <typename scalar_t, typename out_t>
__global__ void box_iou_kernel(int64_t n, int64_t m, const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                               out_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  FRCNN_GRID_STRIDE_LOOP(idx, n * m) {
    const int64_t i = idx / m, j = idx % m;
    const acc_t ax1 = a[4 * i], ay1 = a[4 * i + 1], ax2 = a[4 * i + 2], ay2 = a[4 * i + 3];
    const acc_t bx1 = b[4 * j], by1 = b[4 * j + 1], bx2 = b[4 * j + 2], by2 = b[4 * j + 3];
    out[idx] = static_cast<out_t>(box_iou(ax1, ay1, ax2, ay2, box_area(ax1, ay1, ax2, ay2), bx1, by1, bx2, by2,
                                          box_area(bx1, by1, bx2, by2)));
  }
}

template <typename scalar_t>
__global__ void clip_kernel(int64_t n, const scalar_t* __restrict__ in, at::opmath_type<scalar_t> h,
                            at::opmath_type<scalar_t> w, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  FRCNN_GRID_STRIDE_LOOP(i, n) {
    out[4 * i] = static_cast<scalar_t>(clip_coordinate<acc_t>(in[4 * i], w));
    out[4 * i + 1] = static_cast<scalar_t>(clip_coordinate<acc_t>(in[4 * i + 1], h));
    out[4 * i + 2] = static_cast<scalar_t>(clip_coordinate<acc_t>(in[4 * i + 2], w));
    out[4 * i + 3] = static_cast<scalar_t>(clip_coordinate<acc_t>(in[4 * i + 3], h));
  }
}

template <typename scalar_t>
__global__ void large_enough_kernel(int64_t n, const scalar_t* __restrict__ b, at::opmath_type<scalar_t> min_size,
                                    bool* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  FRCNN_GRID_STRIDE_LOOP(i, n) {
    out[i] = box_is_large_enough<acc_t>(b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3], min_size);
  }
}

template <typename scalar_t>
__global__ void encode_kernel(int64_t n, const scalar_t* __restrict__ r, const scalar_t* __restrict__ p,
                              BoxWeights<at::opmath_type<scalar_t>> w, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  FRCNN_GRID_STRIDE_LOOP(i, n) {
    acc_t t[4];
    encode_box<acc_t>(r[4 * i], r[4 * i + 1], r[4 * i + 2], r[4 * i + 3], p[4 * i], p[4 * i + 1], p[4 * i + 2],
                      p[4 * i + 3], w, t);
    for (int k = 0; k < 4; ++k) out[4 * i + k] = static_cast<scalar_t>(t[k]);
  }
}

template <typename scalar_t>
__global__ void decode_kernel(int64_t n, int64_t classes, const scalar_t* __restrict__ d,
                              const scalar_t* __restrict__ b, BoxWeights<at::opmath_type<scalar_t>> w,
                              at::opmath_type<scalar_t> clip, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  FRCNN_GRID_STRIDE_LOOP(idx, n * classes) {
    const int64_t i = idx / classes;
    const scalar_t* dd = d + idx * 4;
    acc_t t[4];
    decode_box<acc_t>(dd[0], dd[1], dd[2], dd[3], b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3], w, clip, t);
    for (int k = 0; k < 4; ++k) out[idx * 4 + k] = static_cast<scalar_t>(t[k]);
  }
}

template <typename scalar_t>
__global__ void anchor_kernel(int64_t n, int64_t na, int64_t gw, int64_t sh, int64_t sw,
                              const scalar_t* __restrict__ a, scalar_t* __restrict__ out) {
  FRCNN_GRID_STRIDE_LOOP(idx, n) {
    const int64_t k = idx % na, pos = idx / na;
    const scalar_t sx = static_cast<scalar_t>((pos % gw) * sw), sy = static_cast<scalar_t>((pos / gw) * sh);
    out[4 * idx] = sx + a[4 * k];
    out[4 * idx + 1] = sy + a[4 * k + 1];
    out[4 * idx + 2] = sx + a[4 * k + 2];
    out[4 * idx + 3] = sy + a[4 * k + 3];
  }
}

at::Tensor box_iou_cuda(const at::Tensor& boxes1_in, const at::Tensor& boxes2_in) {
  check_boxes(boxes1_in, "box_iou", "boxes1");
  check_boxes(boxes2_in, "box_iou", "boxes2");
  check_same_dtype(boxes1_in, "boxes1", boxes2_in, "boxes2", "box_iou");
  check_same_device(boxes1_in, "boxes1", boxes2_in, "boxes2", "box_iou");
  const c10::cuda::CUDAGuard guard(boxes1_in.device());
  const at::Tensor a = boxes1_in.contiguous(), b = boxes2_in.contiguous();
  const int64_t n = a.size(0), m = b.size(0);
  const at::ScalarType out_type = at::isReducedFloatingType(a.scalar_type()) ? at::kFloat : a.scalar_type();
  at::Tensor out = at::empty({n, m}, a.options().dtype(out_type));
  if (n * m == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "box_iou_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    box_iou_kernel<scalar_t, acc_t><<<blocks_for(n * m), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        n, m, a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor clip_boxes_to_image_cuda(const at::Tensor& boxes_in, int64_t height, int64_t width) {
  check_clip_inputs(boxes_in, height, width);
  const c10::cuda::CUDAGuard guard(boxes_in.device());
  const at::Tensor boxes = boxes_in.contiguous();
  at::Tensor out = at::empty_like(boxes, at::MemoryFormat::Contiguous);
  const int64_t n = boxes.numel() / 4;
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "clip_boxes_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    clip_kernel<scalar_t><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        n, boxes.data_ptr<scalar_t>(), static_cast<acc_t>(height), static_cast<acc_t>(width), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor remove_small_boxes_cuda(const at::Tensor& boxes_in, double min_size) {
  check_boxes(boxes_in, "remove_small_boxes", "boxes");
  const c10::cuda::CUDAGuard guard(boxes_in.device());
  const at::Tensor boxes = boxes_in.contiguous();
  const int64_t n = boxes.size(0);
  at::Tensor mask = at::empty({n}, boxes.options().dtype(at::kBool));
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "remove_small_boxes_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    large_enough_kernel<scalar_t><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        n, boxes.data_ptr<scalar_t>(), static_cast<acc_t>(min_size), mask.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return mask.nonzero().squeeze(1);  // the output size is data-dependent: one sync, as torchvision's torch.where
}

at::Tensor encode_boxes_cuda(const at::Tensor& reference_in, const at::Tensor& proposals_in,
                             at::ArrayRef<double> weights) {
  check_encode_inputs(reference_in, proposals_in, weights);
  const c10::cuda::CUDAGuard guard(reference_in.device());
  const at::Tensor r = reference_in.contiguous(), p = proposals_in.contiguous();
  at::Tensor out = at::empty_like(r, at::MemoryFormat::Contiguous);
  const int64_t n = r.size(0);
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "encode_boxes_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    encode_kernel<scalar_t><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        n, r.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), box_weights<acc_t>(weights), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor decode_boxes_cuda(const at::Tensor& rel_codes_in, const at::Tensor& boxes_in, at::ArrayRef<double> weights,
                             double bbox_xform_clip) {
  check_decode_inputs(rel_codes_in, boxes_in, weights);
  const c10::cuda::CUDAGuard guard(rel_codes_in.device());
  const at::Tensor d = rel_codes_in.contiguous(), b = boxes_in.contiguous();
  at::Tensor out = at::empty_like(d, at::MemoryFormat::Contiguous);
  const int64_t n = d.size(0), classes = d.size(1) / 4;
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "decode_boxes_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    decode_kernel<scalar_t><<<blocks_for(n * classes), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        n, classes, d.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), box_weights<acc_t>(weights),
        static_cast<acc_t>(bbox_xform_clip), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor anchor_grid_cuda(at::TensorList cell_anchors, at::IntArrayRef grid_sizes, at::IntArrayRef strides) {
  check_anchor_inputs(cell_anchors, grid_sizes, strides);
  FRCNN_CHECK(!cell_anchors.empty(), "anchor_grid: cell_anchors must not be empty");
  const c10::cuda::CUDAGuard guard(cell_anchors[0].device());
  int64_t total = 0;
  for (size_t l = 0; l < cell_anchors.size(); ++l) total += grid_sizes[2 * l] * grid_sizes[2 * l + 1] * cell_anchors[l].size(0);
  at::Tensor out = at::empty({total, 4}, cell_anchors[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "anchor_grid_cuda", [&] {
    int64_t offset = 0;
    for (size_t l = 0; l < cell_anchors.size(); ++l) {
      const at::Tensor base = cell_anchors[l].contiguous();
      const int64_t na = base.size(0), n = grid_sizes[2 * l] * grid_sizes[2 * l + 1] * na;
      if (n > 0) {
        anchor_kernel<scalar_t><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            n, na, grid_sizes[2 * l + 1], strides[2 * l], strides[2 * l + 1], base.data_ptr<scalar_t>(),
            out.data_ptr<scalar_t>() + offset * 4);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      offset += n;
    }
  });
  return out;
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, CUDA, m) {
  m.impl("box_iou", &fasterrcnn_ext::box_iou_cuda);
  m.impl("clip_boxes_to_image", &fasterrcnn_ext::clip_boxes_to_image_cuda);
  m.impl("remove_small_boxes", &fasterrcnn_ext::remove_small_boxes_cuda);
  m.impl("encode_boxes", &fasterrcnn_ext::encode_boxes_cuda);
  m.impl("decode_boxes", &fasterrcnn_ext::decode_boxes_cuda);
  m.impl("anchor_grid", &fasterrcnn_ext::anchor_grid_cuda);
}

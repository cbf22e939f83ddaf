// CPU kernels of the box ops and of anchor generation: one fused, parallel pass each where torchvision runs a chain
// of tensor ops (BoxCoder.decode_single alone is about twenty). Math in acc_t (float32 at least), from box_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/common/box_math.h"
#include "ops/common/checks.h"

namespace fasterrcnn_ext {
namespace {

constexpr int64_t kGrain = 2048;  // boxes per task: enough work to pay for a thread

template <typename acc_t>
BoxWeights<acc_t> box_weights(at::ArrayRef<double> w) {
  return {static_cast<acc_t>(w[0]), static_cast<acc_t>(w[1]), static_cast<acc_t>(w[2]), static_cast<acc_t>(w[3])};
}

at::Tensor box_iou_cpu(const at::Tensor& boxes1_in, const at::Tensor& boxes2_in) {
  check_boxes(boxes1_in, "box_iou", "boxes1");
  check_boxes(boxes2_in, "box_iou", "boxes2");
  check_same_dtype(boxes1_in, "boxes1", boxes2_in, "boxes2", "box_iou");
  const at::Tensor boxes1 = boxes1_in.contiguous(), boxes2 = boxes2_in.contiguous();
  const int64_t n = boxes1.size(0), m = boxes2.size(0);
  const at::ScalarType out_type = at::isReducedFloatingType(boxes1.scalar_type()) ? at::kFloat : boxes1.scalar_type();
  at::Tensor out = at::empty({n, m}, boxes1.options().dtype(out_type));
  if (n == 0 || m == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes1.scalar_type(), "box_iou_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = boxes1.data_ptr<scalar_t>();
    const scalar_t* b = boxes2.data_ptr<scalar_t>();
    // boxes2 as acc_t structure-of-arrays, so the inner loop over it vectorises.
    std::vector<acc_t> bx1(m), by1(m), bx2(m), by2(m), barea(m);
    for (int64_t j = 0; j < m; ++j) {
      bx1[j] = b[4 * j];
      by1[j] = b[4 * j + 1];
      bx2[j] = b[4 * j + 2];
      by2[j] = b[4 * j + 3];
      barea[j] = box_area(bx1[j], by1[j], bx2[j], by2[j]);
    }
    acc_t* o = out.data_ptr<acc_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, kGrain / std::max<int64_t>(m, 1)), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const acc_t x1 = a[4 * i], y1 = a[4 * i + 1], x2 = a[4 * i + 2], y2 = a[4 * i + 3];
        const acc_t area = box_area(x1, y1, x2, y2);
        acc_t* row = o + i * m;
        for (int64_t j = 0; j < m; ++j) {
          row[j] = box_iou(x1, y1, x2, y2, area, bx1[j], by1[j], bx2[j], by2[j], barea[j]);
        }
      }
    });
  });
  return out;
}

at::Tensor clip_boxes_to_image_cpu(const at::Tensor& boxes_in, int64_t height, int64_t width) {
  check_clip_inputs(boxes_in, height, width);
  const at::Tensor boxes = boxes_in.contiguous();
  at::Tensor out = at::empty_like(boxes, at::MemoryFormat::Contiguous);
  const int64_t n = boxes.numel() / 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "clip_boxes_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = boxes.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t w = static_cast<acc_t>(width), h = static_cast<acc_t>(height);
    at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        o[4 * i] = static_cast<scalar_t>(clip_coordinate<acc_t>(in[4 * i], w));
        o[4 * i + 1] = static_cast<scalar_t>(clip_coordinate<acc_t>(in[4 * i + 1], h));
        o[4 * i + 2] = static_cast<scalar_t>(clip_coordinate<acc_t>(in[4 * i + 2], w));
        o[4 * i + 3] = static_cast<scalar_t>(clip_coordinate<acc_t>(in[4 * i + 3], h));
      }
    });
  });
  return out;
}

at::Tensor remove_small_boxes_cpu(const at::Tensor& boxes_in, double min_size) {
  check_boxes(boxes_in, "remove_small_boxes", "boxes");
  const at::Tensor boxes = boxes_in.contiguous();
  const int64_t n = boxes.size(0);
  std::vector<int64_t> keep;
  keep.reserve(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "remove_small_boxes_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* b = boxes.data_ptr<scalar_t>();
    const acc_t min_side = static_cast<acc_t>(min_size);
    for (int64_t i = 0; i < n; ++i) {
      if (box_is_large_enough<acc_t>(b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3], min_side)) keep.push_back(i);
    }
  });
  at::Tensor out = at::empty({static_cast<int64_t>(keep.size())}, boxes.options().dtype(at::kLong));
  std::copy(keep.begin(), keep.end(), out.data_ptr<int64_t>());
  return out;
}

at::Tensor encode_boxes_cpu(const at::Tensor& reference_in, const at::Tensor& proposals_in,
                            at::ArrayRef<double> weights) {
  check_encode_inputs(reference_in, proposals_in, weights);
  const at::Tensor reference = reference_in.contiguous(), proposals = proposals_in.contiguous();
  at::Tensor out = at::empty_like(reference, at::MemoryFormat::Contiguous);
  const int64_t n = reference.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, reference.scalar_type(), "encode_boxes_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BoxWeights<acc_t> w = box_weights<acc_t>(weights);
    const scalar_t* r = reference.data_ptr<scalar_t>();
    const scalar_t* p = proposals.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        acc_t t[4];
        encode_box<acc_t>(r[4 * i], r[4 * i + 1], r[4 * i + 2], r[4 * i + 3], p[4 * i], p[4 * i + 1], p[4 * i + 2],
                          p[4 * i + 3], w, t);
        for (int k = 0; k < 4; ++k) o[4 * i + k] = static_cast<scalar_t>(t[k]);
      }
    });
  });
  return out;
}

// Decodes n rows of `classes` boxes each. The rows are processed in chunks moved to structure-of-arrays buffers, so
// the arithmetic loop (decode_box, box_exp included) vectorises; the float version is compiled per SIMD target.
template <typename acc_t>
__attribute__((always_inline)) inline void decode_rows_impl(const acc_t* __restrict__ d, const acc_t* __restrict__ b,
                                                             int64_t n, int64_t classes, const BoxWeights<acc_t>& w,
                                                             acc_t clip, acc_t* __restrict__ o) {
  constexpr int64_t kChunk = 256;
  alignas(64) acc_t in[8][kChunk];
  alignas(64) acc_t res[4][kChunk];
  const int64_t total = n * classes;
  for (int64_t j0 = 0; j0 < total; j0 += kChunk) {
    const int64_t m = std::min(kChunk, total - j0);
    for (int64_t k = 0; k < m; ++k) {
      const int64_t j = j0 + k, i = j / classes;
      for (int q = 0; q < 4; ++q) {
        in[q][k] = d[4 * j + q];
        in[4 + q][k] = b[4 * i + q];
      }
    }
    for (int64_t k = 0; k < m; ++k) {
      acc_t r[4];
      decode_box<acc_t>(in[0][k], in[1][k], in[2][k], in[3][k], in[4][k], in[5][k], in[6][k], in[7][k], w, clip, r);
      res[0][k] = r[0];
      res[1][k] = r[1];
      res[2][k] = r[2];
      res[3][k] = r[3];
    }
    for (int64_t k = 0; k < m; ++k) {
      for (int q = 0; q < 4; ++q) o[4 * (j0 + k) + q] = res[q][k];
    }
  }
}
FRCNN_CPU_MULTIVERSION void decode_rows(const float* d, const float* b, int64_t n, int64_t classes,
                                        const BoxWeights<float>& w, float clip, float* o) {
  decode_rows_impl(d, b, n, classes, w, clip, o);
}
FRCNN_CPU_MULTIVERSION void decode_rows(const double* d, const double* b, int64_t n, int64_t classes,
                                        const BoxWeights<double>& w, double clip, double* o) {
  decode_rows_impl(d, b, n, classes, w, clip, o);
}

at::Tensor decode_boxes_cpu(const at::Tensor& rel_codes_in, const at::Tensor& boxes_in, at::ArrayRef<double> weights,
                            double bbox_xform_clip) {
  check_decode_inputs(rel_codes_in, boxes_in, weights);
  const at::Tensor rel_codes = rel_codes_in.contiguous(), boxes = boxes_in.contiguous();
  at::Tensor out = at::empty_like(rel_codes, at::MemoryFormat::Contiguous);
  const int64_t n = rel_codes.size(0), classes = rel_codes.size(1) / 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rel_codes.scalar_type(), "decode_boxes_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BoxWeights<acc_t> w = box_weights<acc_t>(weights);
    const acc_t clip = static_cast<acc_t>(bbox_xform_clip);
    // Half types are converted to float32 first (one pass each way), so every dtype runs the vectorised loop.
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor d = rel_codes.to(acc_type), b = boxes.to(acc_type);
    at::Tensor o = std::is_same_v<scalar_t, acc_t> ? out : at::empty(out.sizes(), out.options().dtype(acc_type));
    const acc_t* dp = d.data_ptr<acc_t>();
    const acc_t* bp = b.data_ptr<acc_t>();
    acc_t* op = o.data_ptr<acc_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, kGrain / classes), [&](int64_t lo, int64_t hi) {
      decode_rows(dp + lo * classes * 4, bp + lo * 4, hi - lo, classes, w, clip, op + lo * classes * 4);
    });
    if (!std::is_same_v<scalar_t, acc_t>) out.copy_(o);
  });
  return out;
}

at::Tensor anchor_grid_cpu(at::TensorList cell_anchors, at::IntArrayRef grid_sizes, at::IntArrayRef strides) {
  check_anchor_inputs(cell_anchors, grid_sizes, strides);
  FRCNN_CHECK(!cell_anchors.empty(), "anchor_grid: cell_anchors must not be empty");
  int64_t total = 0;
  for (size_t l = 0; l < cell_anchors.size(); ++l) total += grid_sizes[2 * l] * grid_sizes[2 * l + 1] * cell_anchors[l].size(0);
  at::Tensor out = at::empty({total, 4}, cell_anchors[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "anchor_grid_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    int64_t offset = 0;
    for (size_t l = 0; l < cell_anchors.size(); ++l) {
      const at::Tensor base = cell_anchors[l].contiguous();
      const scalar_t* a = base.data_ptr<scalar_t>();
      const int64_t na = base.size(0), gh = grid_sizes[2 * l], gw = grid_sizes[2 * l + 1];
      const int64_t sh = strides[2 * l], sw = strides[2 * l + 1];
      scalar_t* lo_out = o + offset * 4;
      at::parallel_for(0, gh * gw, std::max<int64_t>(1, kGrain / std::max<int64_t>(na, 1)), [&](int64_t lo, int64_t hi) {
        for (int64_t pos = lo; pos < hi; ++pos) {
          // torchvision adds the integer shift, converted to the anchors' dtype, to the cell anchor.
          const scalar_t sx = static_cast<scalar_t>((pos % gw) * sw), sy = static_cast<scalar_t>((pos / gw) * sh);
          for (int64_t k = 0; k < na; ++k) {
            scalar_t* dst = lo_out + (pos * na + k) * 4;
            dst[0] = sx + a[4 * k];
            dst[1] = sy + a[4 * k + 1];
            dst[2] = sx + a[4 * k + 2];
            dst[3] = sy + a[4 * k + 3];
          }
        }
      });
      offset += gh * gw * na;
    }
  });
  return out;
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, CPU, m) {
  m.impl("box_iou", &fasterrcnn_ext::box_iou_cpu);
  m.impl("clip_boxes_to_image", &fasterrcnn_ext::clip_boxes_to_image_cpu);
  m.impl("remove_small_boxes", &fasterrcnn_ext::remove_small_boxes_cpu);
  m.impl("encode_boxes", &fasterrcnn_ext::encode_boxes_cpu);
  m.impl("decode_boxes", &fasterrcnn_ext::decode_boxes_cpu);
  m.impl("anchor_grid", &fasterrcnn_ext::anchor_grid_cpu);
}

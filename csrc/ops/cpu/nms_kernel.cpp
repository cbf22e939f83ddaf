// CPU kernels of nms and batched_nms.
//
// torchvision's CPU NMS compares every kept box with every later box in a scalar loop. Here:
//  - boxes are gathered once in score order into structure-of-arrays buffers in the accumulation type;
//  - each kept box suppresses the remaining candidates in one branch-free loop that the compiler vectorises
//    (compiled for AVX-512, AVX2 and baseline; the best is picked at load time);
//  - suppressed candidates are compacted away once they make up half of the tail, so clustered (RPN-like)
//    inputs get cheaper as they are suppressed;
//  - batched_nms sorts by (class, score) and runs the classes in parallel with at::parallel_for.
// Sizes and indices are int64 throughout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

#include "ops/common/box_math.h"
#include "ops/common/checks.h"
#include "ops/cpu/nms_cpu.h"

namespace fasterrcnn_ext {
namespace {

// A flag of the same width as acc_t, so the suppression loop has one vector width throughout.
template <typename acc_t>
using flag_of = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;

// Marks every candidate j in (i, end) whose IoU with box i exceeds the threshold; returns how many were newly
// marked.
template <typename acc_t>
__attribute__((always_inline)) inline int64_t suppress_overlaps_impl(int64_t i, int64_t end, const acc_t* x1,
                                                                     const acc_t* y1, const acc_t* x2,
                                                                     const acc_t* y2, const acc_t* area,
                                                                     flag_of<acc_t>* dead, acc_t threshold) {
  using flag_t = flag_of<acc_t>;
  const acc_t ix1 = x1[i], iy1 = y1[i], ix2 = x2[i], iy2 = y2[i], iarea = area[i];
  flag_t newly = 0;
  for (int64_t j = i + 1; j < end; ++j) {
    const acc_t iou = box_iou(ix1, iy1, ix2, iy2, iarea, x1[j], y1[j], x2[j], y2[j], area[j]);
    const flag_t over = iou > threshold ? 1 : 0;
    newly += over & (dead[j] ^ 1);
    dead[j] |= over;
  }
  return newly;
}

FRCNN_CPU_MULTIVERSION int64_t suppress_overlaps(int64_t i, int64_t end, const float* x1, const float* y1,
                                                 const float* x2, const float* y2, const float* area, int32_t* dead,
                                                 float threshold) {
  return suppress_overlaps_impl<float>(i, end, x1, y1, x2, y2, area, dead, threshold);
}

FRCNN_CPU_MULTIVERSION int64_t suppress_overlaps(int64_t i, int64_t end, const double* x1, const double* y1,
                                                 const double* x2, const double* y2, const double* area,
                                                 int64_t* dead, double threshold) {
  return suppress_overlaps_impl<double>(i, end, x1, y1, x2, y2, area, dead, threshold);
}

// Boxes in processing order as structure-of-arrays; `pos[k]` is the original index of the k-th box.
template <typename acc_t>
struct SortedBoxes {
  std::vector<acc_t> x1, y1, x2, y2, area;
  std::vector<flag_of<acc_t>> dead;
  std::vector<int64_t> pos;
  explicit SortedBoxes(int64_t n) : x1(n), y1(n), x2(n), y2(n), area(n), dead(n, 0), pos(n) {}
};

// Removes the dead candidates of [begin, end) in place; returns the new end.
template <typename acc_t>
int64_t compact(SortedBoxes<acc_t>& b, int64_t begin, int64_t end) {
  int64_t w = begin;
  for (int64_t j = begin; j < end; ++j) {
    b.x1[w] = b.x1[j];
    b.y1[w] = b.y1[j];
    b.x2[w] = b.x2[j];
    b.y2[w] = b.y2[j];
    b.area[w] = b.area[j];
    b.pos[w] = b.pos[j];
    w += b.dead[j] ^ 1;  // branch-free: a dead box is overwritten by the next live one
  }
  std::fill(b.dead.begin() + begin, b.dead.begin() + w, 0);
  return w;
}

// Greedy NMS over the already sorted boxes [begin, end). Writes the original indices of kept boxes to
// keep_out (in order) and returns how many were kept (at most max_keep when max_keep >= 0).
template <typename acc_t>
int64_t greedy_nms(SortedBoxes<acc_t>& b, int64_t begin, int64_t end, acc_t threshold, int64_t max_keep,
                   int64_t* keep_out) {
  // Compacting costs about one pass over the tail, so it only pays once much of the tail is dead.
  constexpr int64_t kMinTailToCompact = 64;
  int64_t kept = 0;
  int64_t dead_in_tail = 0;  // dead candidates in (i, end)
  for (int64_t i = begin; i < end; ++i) {
    if (b.dead[i]) {
      --dead_in_tail;
      continue;
    }
    keep_out[kept++] = b.pos[i];
    if (kept == max_keep) break;
    dead_in_tail += suppress_overlaps(i, end, b.x1.data(), b.y1.data(), b.x2.data(), b.y2.data(), b.area.data(),
                                      b.dead.data(), threshold);
    const int64_t tail = end - i - 1;
    if (tail >= kMinTailToCompact && 2 * dead_in_tail > tail) {
      end = compact(b, i + 1, end);
      dead_in_tail = 0;
    }
  }
  return kept;
}

// Score order: higher first, NaN after every number, ties by lower index. A strict weak order on indices.
template <typename acc_t>
struct ScoreOrder {
  const acc_t* s;
  bool operator()(int64_t a, int64_t b) const {
    const bool na = std::isnan(s[a]), nb = std::isnan(s[b]);
    if (na != nb) return nb;
    if (!na && s[a] != s[b]) return s[a] > s[b];
    return a < b;
  }
};

}  // namespace

template <typename acc_t>
std::vector<int64_t> nms_keep(const acc_t* boxes, const acc_t* scores, const int64_t* classes, int64_t n,
                              double iou_threshold, int64_t max_keep) {
  if (n == 0 || max_keep == 0) return {};
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  const ScoreOrder<acc_t> by_score{scores};
  // Segments of one class each: [seg_begin[c], seg_begin[c + 1]).
  std::vector<int64_t> seg_begin{0};
  if (classes != nullptr) {
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      if (classes[a] != classes[b]) return classes[a] < classes[b];
      return by_score(a, b);
    });
    for (int64_t k = 1; k < n; ++k) {
      if (classes[order[k]] != classes[order[k - 1]]) seg_begin.push_back(k);
    }
  } else {
    std::sort(order.begin(), order.end(), by_score);
  }
  seg_begin.push_back(n);
  const int64_t num_segments = static_cast<int64_t>(seg_begin.size()) - 1;

  SortedBoxes<acc_t> b(n);
  at::parallel_for(0, n, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const acc_t* p = boxes + 4 * order[k];
      b.x1[k] = p[0];
      b.y1[k] = p[1];
      b.x2[k] = p[2];
      b.y2[k] = p[3];
      b.area[k] = box_area(b.x1[k], b.y1[k], b.x2[k], b.y2[k]);
      b.pos[k] = order[k];
    }
  });

  const acc_t threshold = iou_threshold_as<acc_t>(iou_threshold);
  std::vector<int64_t> keep_buf(n);
  std::vector<int64_t> kept_count(num_segments);
  // One class per task; grain 1 because classes can be large.
  at::parallel_for(0, num_segments, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      kept_count[c] = greedy_nms(b, seg_begin[c], seg_begin[c + 1], threshold, max_keep, keep_buf.data() + seg_begin[c]);
    }
  });

  std::vector<int64_t> keep;
  keep.reserve(n);
  for (int64_t c = 0; c < num_segments; ++c) {
    keep.insert(keep.end(), keep_buf.begin() + seg_begin[c], keep_buf.begin() + seg_begin[c] + kept_count[c]);
  }
  if (num_segments > 1) std::sort(keep.begin(), keep.end(), by_score);
  if (max_keep >= 0 && static_cast<int64_t>(keep.size()) > max_keep) keep.resize(max_keep);
  return keep;
}

template std::vector<int64_t> nms_keep<float>(const float*, const float*, const int64_t*, int64_t, double, int64_t);
template std::vector<int64_t> nms_keep<double>(const double*, const double*, const int64_t*, int64_t, double, int64_t);

namespace {

template <typename scalar_t>
at::Tensor nms_cpu_typed(const at::Tensor& boxes_in, const at::Tensor& scores_in, const at::Tensor* idxs_in,
                         double iou_threshold, int64_t max_keep) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor boxes = boxes_in.to(acc_type).contiguous(), scores = scores_in.to(acc_type).contiguous();
  at::Tensor classes;
  if (idxs_in != nullptr) classes = idxs_in->to(at::kLong).contiguous();
  const std::vector<int64_t> keep =
      nms_keep<acc_t>(boxes.data_ptr<acc_t>(), scores.data_ptr<acc_t>(),
                      idxs_in != nullptr ? classes.data_ptr<int64_t>() : nullptr, boxes.size(0), iou_threshold,
                      max_keep);
  at::Tensor out = at::empty({static_cast<int64_t>(keep.size())}, boxes_in.options().dtype(at::kLong));
  std::copy(keep.begin(), keep.end(), out.data_ptr<int64_t>());
  return out;
}

at::Tensor nms_cpu_common(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor* idxs,
                          double iou_threshold, int64_t max_keep, const char* op) {
  check_nms_inputs(boxes, scores, idxs, op);
  if (boxes.size(0) == 0 || max_keep == 0) {
    return at::empty({0}, boxes.options().dtype(at::kLong));
  }
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "nms_cpu", [&] {
    out = nms_cpu_typed<scalar_t>(boxes, scores, idxs, iou_threshold, max_keep);
  });
  return out;
}

at::Tensor nms_cpu(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold, int64_t max_keep) {
  return nms_cpu_common(dets, scores, nullptr, iou_threshold, max_keep, "nms");
}

at::Tensor batched_nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                           double iou_threshold, int64_t max_keep) {
  return nms_cpu_common(boxes, scores, &idxs, iou_threshold, max_keep, "batched_nms");
}

at::Tensor batched_nms_keep_mask_cpu(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                                     double iou_threshold) {
  const at::Tensor kept = nms_cpu_common(boxes, scores, &idxs, iou_threshold, -1, "batched_nms_keep_mask");
  return at::zeros({boxes.size(0)}, boxes.options().dtype(at::kBool)).index_fill_(0, kept, true);
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, CPU, m) {
  m.impl("nms", &fasterrcnn_ext::nms_cpu);
  m.impl("batched_nms", &fasterrcnn_ext::batched_nms_cpu);
  m.impl("batched_nms_keep_mask", &fasterrcnn_ext::batched_nms_keep_mask_cpu);
}

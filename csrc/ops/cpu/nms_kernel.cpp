// CPU kernels of nms and batched_nms.
//
// torchvision's CPU NMS compares every kept box with every later box in a scalar loop. Here:
//  - boxes are gathered once in score order into structure-of-arrays buffers in the accumulation type;
//  - each kept box suppresses the remaining candidates in one branch-free loop that the compiler vectorises
//    (compiled for AVX-512, AVX2 and baseline; the best is picked at load time);
//  - suppressed candidates are compacted away once they make up half of the tail, so clustered (RPN-like)
//    inputs get cheaper as they are suppressed;
//  - the score order is a radix sort on integer keys; batched_nms then groups it by class with a counting sort and
//    runs the classes in parallel with at::parallel_for.
// Sizes and indices are int64 throughout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

#include "ops/common/box_math.h"
#include "ops/common/checks.h"
#include "ops/common/nms_bitmask.h"
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

// Boxes in processing order as structure-of-arrays; `pos[k]` is the k-th box's rank (position in score order).
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

// Greedy NMS over the already sorted boxes [begin, end). Writes the ranks (b.pos) of kept boxes to keep_out (in
// order) and returns how many were kept (at most max_keep when max_keep >= 0).
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

// Indices 0..n-1 sorted stably by key ascending: an LSD radix sort, one byte a pass. One counting pass makes all
// eight histograms; a byte that every key shares needs no pass (scores in [0, 1] share their top bytes). On 20,000
// scores it takes a fraction of std::sort's time with a comparator (which was most of batched_nms's time).
std::vector<int64_t> stable_order_by_key(const std::vector<uint64_t>& key) {
  const int64_t n = static_cast<int64_t>(key.size());
  std::vector<int64_t> order(n), scratch(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::vector<std::array<int64_t, 256>> counts(8);
  for (auto& c : counts) c.fill(0);
  for (int64_t i = 0; i < n; ++i) {
    for (int byte = 0; byte < 8; ++byte) ++counts[byte][(key[i] >> (8 * byte)) & 0xff];
  }
  for (int byte = 0; byte < 8; ++byte) {
    std::array<int64_t, 256>& c = counts[byte];
    if (*std::max_element(c.begin(), c.end()) == n) continue;  // every key has the same byte here
    int64_t sum = 0;
    for (int64_t& v : c) {
      const int64_t count = v;
      v = sum;
      sum += count;
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = order[i];
      scratch[c[(key[id] >> (8 * byte)) & 0xff]++] = id;
    }
    order.swap(scratch);
  }
  return order;
}

// NMS order of the scores (higher first, -0 tied with +0, NaN after every number, ties by lower index) as the
// indices in that order: nms_order_key (common/nms_bitmask.h, shared with the CUDA kernels), sign bit flipped so
// that unsigned order is its order.
template <typename acc_t>
std::vector<int64_t> score_order(const acc_t* scores, int64_t n) {
  std::vector<uint64_t> key(n);
  for (int64_t i = 0; i < n; ++i) {
    key[i] = static_cast<uint64_t>(nms_order_key(scores[i])) ^ (uint64_t{1} << 63);
  }
  return stable_order_by_key(key);
}

// `ranks` (positions in score order, ascending) grouped by class, stably, so each class stays in score order; the
// group of class value v is contiguous. A counting sort where the classes span a range of at most 4n + 1024 values,
// else a stable comparison sort on the class alone. Appends each group's start to seg_begin.
std::vector<int64_t> group_by_class(const std::vector<int64_t>& by_score, const int64_t* classes,
                                    std::vector<int64_t>& seg_begin) {
  const int64_t n = static_cast<int64_t>(by_score.size());
  const auto [lo_it, hi_it] = std::minmax_element(classes, classes + n);
  const int64_t lo = *lo_it, hi = *hi_it;
  std::vector<int64_t> ranks(n);
  // hi - lo as unsigned: classes may span all of int64.
  const uint64_t span = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
  if (span <= static_cast<uint64_t>(4 * n + 1024)) {
    std::vector<int64_t> start(span + 2, 0);
    for (int64_t r = 0; r < n; ++r) ++start[classes[by_score[r]] - lo + 1];
    for (uint64_t v = 1; v < span + 2; ++v) {
      if (start[v] != 0) seg_begin.push_back(start[v - 1]);
      start[v] += start[v - 1];
    }
    for (int64_t r = 0; r < n; ++r) ranks[start[classes[by_score[r]] - lo]++] = r;
    return ranks;
  }
  std::iota(ranks.begin(), ranks.end(), int64_t{0});
  std::stable_sort(ranks.begin(), ranks.end(),
                   [&](int64_t a, int64_t b) { return classes[by_score[a]] < classes[by_score[b]]; });
  for (int64_t k = 0; k < n; ++k) {
    if (k == 0 || classes[by_score[ranks[k]]] != classes[by_score[ranks[k - 1]]]) seg_begin.push_back(k);
  }
  return ranks;
}

}  // namespace

template <typename acc_t>
std::vector<int64_t> nms_keep(const acc_t* boxes, const acc_t* scores, const int64_t* classes, int64_t n,
                              double iou_threshold, int64_t max_keep) {
  if (n == 0 || max_keep == 0) return {};
  const std::vector<int64_t> by_score = score_order(scores, n);
  // Processing order, as ranks (positions in by_score): score order, or grouped by class (each class in score
  // order), with one segment [seg_begin[c], seg_begin[c + 1]) per class.
  std::vector<int64_t> seg_begin;
  std::vector<int64_t> ranks;
  if (classes != nullptr) {
    ranks = group_by_class(by_score, classes, seg_begin);
  } else {
    ranks.resize(n);
    std::iota(ranks.begin(), ranks.end(), int64_t{0});
    seg_begin.push_back(0);
  }
  seg_begin.push_back(n);
  const int64_t num_segments = static_cast<int64_t>(seg_begin.size()) - 1;

  SortedBoxes<acc_t> b(n);
  at::parallel_for(0, n, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const acc_t* p = boxes + 4 * by_score[ranks[k]];
      b.x1[k] = p[0];
      b.y1[k] = p[1];
      b.x2[k] = p[2];
      b.y2[k] = p[3];
      b.area[k] = box_area(b.x1[k], b.y1[k], b.x2[k], b.y2[k]);
      b.pos[k] = ranks[k];
    }
  });

  const acc_t threshold = iou_threshold_as<acc_t>(iou_threshold);
  std::vector<int64_t> keep_buf(n);  // kept ranks, per segment
  std::vector<int64_t> kept_count(num_segments);
  // One class per task; grain 1 because classes can be large.
  at::parallel_for(0, num_segments, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      kept_count[c] = greedy_nms(b, seg_begin[c], seg_begin[c + 1], threshold, max_keep, keep_buf.data() + seg_begin[c]);
    }
  });

  // Back to score order across classes: the kept ranks, ascending.
  std::vector<int64_t> keep;
  if (num_segments == 1) {
    keep.assign(keep_buf.begin(), keep_buf.begin() + kept_count[0]);
  } else {
    std::vector<uint8_t> kept(n, 0);
    for (int64_t c = 0; c < num_segments; ++c) {
      for (int64_t k = 0; k < kept_count[c]; ++k) kept[keep_buf[seg_begin[c] + k]] = 1;
    }
    for (int64_t r = 0; r < n; ++r) {
      if (kept[r]) keep.push_back(r);
    }
  }
  if (max_keep >= 0 && static_cast<int64_t>(keep.size()) > max_keep) keep.resize(max_keep);
  for (int64_t& r : keep) r = by_score[r];
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

// The CPU has no device to keep waiting: the valid boxes are selected first and their keep mask scattered back.
at::Tensor batched_nms_keep_mask_valid_cpu(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                                           const at::Tensor& valid, double iou_threshold) {
  const char* op = "_batched_nms_keep_mask_valid";
  check_nms_inputs(boxes, scores, &idxs, op);
  check_nms_valid(valid, boxes, op);
  at::Tensor out = at::zeros({boxes.size(0)}, boxes.options().dtype(at::kBool));
  const at::Tensor rows = valid.nonzero().squeeze(1);
  if (rows.numel() == 0) return out;
  const at::Tensor valid_idxs = idxs.index_select(0, rows);
  const at::Tensor kept = nms_cpu_common(boxes.index_select(0, rows), scores.index_select(0, rows), &valid_idxs,
                                         iou_threshold, -1, op);
  return out.index_fill_(0, rows.index_select(0, kept), true);
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, CPU, m) {
  m.impl("nms", &fasterrcnn_ext::nms_cpu);
  m.impl("batched_nms", &fasterrcnn_ext::batched_nms_cpu);
  m.impl("batched_nms_keep_mask", &fasterrcnn_ext::batched_nms_keep_mask_cpu);
  m.impl("_batched_nms_keep_mask_valid", &fasterrcnn_ext::batched_nms_keep_mask_valid_cpu);
}

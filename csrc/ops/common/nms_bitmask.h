// The bitmask NMS of the CUDA kernel (cuda/nms_kernel.cu), written once for both devices.
//
// The steps: order the boxes in one sort (score descending, NaN last, ties by lower index; batched: by class first,
// class and score in one 64-bit key; 32-bit score keys where the scores are floats); build a
// mask in which word c of row i holds the bits of boxes 64c..64c+63 that box i suppresses (IoU > threshold, same
// class, later in the order); then walk the mask one 64-box block at a time: the block's kept boxes follow from its
// removed bits and its diagonal words alone, and the kept rows are ORed into the removed bits of every later block.
//
// The per-element functions below are FRCNN_HOST_DEVICE, and the host steps are a template over the device's
// kernels, so the private op `_nms_bitmask` runs the very same steps on the CPU (cpu/nms_bitmask_kernel.cpp): the
// CPU tests cover the CUDA NMS's order, index arithmetic, chunking, class skipping and early exit. What is CUDA's
// own is only the launch geometry, the shared memory and the barriers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#include "box_math.h"
#include "host_device.h"

namespace fasterrcnn_ext {

constexpr int kNmsBlockBoxes = 64;  // boxes per mask word
// The mask is built in chunks of rows so that 10^6 boxes do not need a terabyte-sized mask: at most this much.
constexpr int64_t kNmsMaskBudgetBytes = int64_t{256} << 20;

// A box as the mask pass compares it: corners, area and class (0 when not batched).
template <typename acc_t>
struct NmsBox {
  acc_t x1, y1, x2, y2, area;
  int64_t cls;
};

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
FRCNN_INLINE NmsBox<acc_t> nms_load_box(const scalar_t* boxes, const int64_t* classes, int64_t i) {
  const acc_t x1 = boxes[4 * i], y1 = boxes[4 * i + 1], x2 = boxes[4 * i + 2], y2 = boxes[4 * i + 3];
  return {x1, y1, x2, y2, box_area(x1, y1, x2, y2), classes != nullptr ? classes[i] : 0};
}

// One mask word: bit k set when cols[k] (first <= k < size) has row's class and IoU with it above the threshold.
template <typename acc_t>
FRCNN_INLINE uint64_t nms_mask_word(const NmsBox<acc_t>& row, const NmsBox<acc_t>* cols, int first, int size,
                                    acc_t threshold) {
  uint64_t bits = 0;
  for (int k = first; k < size; ++k) {
    const NmsBox<acc_t>& c = cols[k];
    if (c.cls == row.cls &&
        box_iou(row.x1, row.y1, row.x2, row.y2, row.area, c.x1, c.y1, c.x2, c.y2, c.area) > threshold) {
      bits |= uint64_t{1} << k;
    }
  }
  return bits;
}

// A class as the sort key holds it: clamped to int32 (classes past that range share a bucket, still compared in full
// by nms_mask_word).
FRCNN_INLINE int32_t nms_class_bucket(int64_t cls) {
  return static_cast<int32_t>(cls < INT32_MIN ? INT32_MIN : (cls > INT32_MAX ? INT32_MAX : cls));
}

// Boxes sorted by class bucket: a column block whose first bucket is past the row block's last shares no class with
// it, so its words are all zero (batched_nms over many classes skips most blocks), and neither does any later column
// block. classes == nullptr: one class.
FRCNN_INLINE bool nms_blocks_share_a_class(const int64_t* classes, int64_t row_start, int row_size,
                                           int64_t col_start) {
  return classes == nullptr ||
         nms_class_bucket(classes[col_start]) <= nms_class_bucket(classes[row_start + row_size - 1]);
}

// The index of x's lowest set bit; x != 0.
FRCNN_INLINE int lowest_set_bit(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __ffsll(static_cast<long long>(x)) - 1;
#else
  return __builtin_ctzll(x);
#endif
}

// The greedy pass over one block of `size` boxes: `removed` holds the bits of its boxes suppressed by earlier
// blocks, diag[k] is box k's mask word for this block (only bits after k set). Returns the bits of the kept boxes;
// counts them in *kept and stops once *kept reaches max_keep (max_keep < 0: no limit). Steps from candidate to
// candidate, so it costs one step per kept box, not one per box.
FRCNN_INLINE uint64_t nms_walk_block(uint64_t removed, const uint64_t* diag, int size, int64_t* kept,
                                     int64_t max_keep) {
  const uint64_t in_block = size >= kNmsBlockBoxes ? ~uint64_t{0} : (uint64_t{1} << size) - 1;
  uint64_t candidates = ~removed & in_block;
  uint64_t kept_bits = 0;
  while (candidates != 0 && !(max_keep >= 0 && *kept >= max_keep)) {
    const int k = lowest_set_bit(candidates);
    kept_bits |= uint64_t{1} << k;
    ++*kept;
    candidates &= ~diag[k];         // the later boxes that k suppresses
    candidates &= candidates - 1;   // and k itself, the lowest bit
  }
  return kept_bits;
}

FRCNN_INLINE int popcount64(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __popcll(static_cast<unsigned long long>(x));
#else
  return __builtin_popcountll(x);
#endif
}

// The rank of row k among the kept rows of a block: its slot in the block's kept-row list.
FRCNN_INLINE int nms_kept_rank(uint64_t kept_bits, int k) {
  return popcount64(kept_bits & ((uint64_t{1} << k) - 1));
}

// How many lanes OR one column word of a block's kept rows: the kept count rounded up to a power of 2, at most a
// warp's 32 (then each lane ORs two rows).
FRCNN_INLINE int nms_or_group_size(int kept) {
  int group = 1;
  while (group < kept && group < 32) group *= 2;
  return group;
}

// Lane `slot` of a group of `group` lanes: the OR of column word c of kept rows slot, slot + group, ... (kept_rows
// lists the block's `kept` kept rows; `block_rows` is the mask row of the block's first box, rows col_blocks words
// apart). The OR of all slots' words is what the kept rows remove from column block c; the loads are independent,
// so the lanes issue them at once.
FRCNN_INLINE uint64_t nms_kept_rows_slot_word(const uint64_t* block_rows, int64_t col_blocks, const int* kept_rows,
                                              int kept, int slot, int group, int64_t c) {
  uint64_t word = 0;
  for (int k = slot; k < kept; k += group) word |= block_rows[kept_rows[k] * col_blocks + c];
  return word;
}

// An integer whose ascending order is the NMS order of the scores: higher score first, -0 tied with +0, NaN after
// every number (-inf included). One sort on it replaces a sort on the scores plus one on NaN-ness. Int is the
// float's same-size signed integer.
template <typename Float, typename Int>
FRCNN_INLINE Int nms_order_key_bits(Float score) {
  constexpr Int kMax = std::numeric_limits<Int>::max();
  if (score != score) return kMax;
  score = score + Float(0);  // -0 becomes +0
  Int bits;
  memcpy(&bits, &score, sizeof bits);
  // As a signed integer, a float's bit pattern orders the non-negative floats; flipping the magnitude bits of the
  // negative ones orders those too. ~ then reverses the order without overflow, and never gives kMax: ordered is
  // above the minimum for every non-NaN value.
  const Int ordered = bits < 0 ? static_cast<Int>(bits ^ kMax) : bits;
  return static_cast<Int>(~ordered);
}

// The key of float scores in 32 bits (half and bfloat16 widen to float exactly): sorting half as many key bytes.
FRCNN_INLINE int32_t nms_order_key32(float score) { return nms_order_key_bits<float, int32_t>(score); }

// As an int64 (the serial CPU NMS's radix key): nms_order_key32, widened.
FRCNN_INLINE int64_t nms_order_key(float score) { return nms_order_key32(score); }

FRCNN_INLINE int64_t nms_order_key(double score) { return nms_order_key_bits<double, int64_t>(score); }

// batched_nms's one sort key: class bucket in the high 32 bits, nms_order_key32 (offset to unsigned) in the low 32,
// so that ascending order is (class, score descending, NaN last); a stable sort breaks ties by index.
FRCNN_INLINE int64_t nms_class_order_key(float score, int64_t cls) {
  const uint32_t low = static_cast<uint32_t>(nms_order_key32(score)) ^ 0x80000000u;
  return static_cast<int64_t>(nms_class_bucket(cls)) * (int64_t{1} << 32) + static_cast<int64_t>(low);
}

// ---- host steps ----

// What one sort orders the boxes by (Kernels::sort_key computes it on the device):
//  - float, half, bfloat16 scores: nms_order_key32 (int32), or for batched_nms nms_class_order_key (int64), whose
//    stable sort gives the (class, score, index) order at once;
//  - double scores: nms_order_key (int64); batched_nms then sorts by class in a second stable sort.
struct NmsSortKey {
  at::Tensor key;
  bool has_class = false;  // key is nms_class_order_key
};

// The key buffer for `scores` (contiguous) and whether it takes the class: int32 for float-like scores without
// classes, int64 otherwise; the device kernel fills it.
inline NmsSortKey nms_empty_sort_key(const at::Tensor& scores, bool batched) {
  const bool key32 = scores.scalar_type() != at::kDouble;  // half and bfloat16 widen to float exactly
  const bool has_class = batched && key32;
  return {at::empty({scores.size(0)}, scores.options().dtype(key32 && !has_class ? at::kInt : at::kLong)),
          has_class};
}

// The NMS order (ties by lower index: stable sorts) and, when batched, the classes (int64) in that order.
inline std::pair<at::Tensor, at::Tensor> nms_sort_order(const NmsSortKey& key, const at::Tensor* classes) {
  at::Tensor order = std::get<1>(key.key.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  if (classes == nullptr) return {order, at::Tensor()};
  if (key.has_class) return {order, classes->index_select(0, order)};
  const auto [classes_sorted, by_class] = classes->index_select(0, order).sort(/*stable=*/true, 0, false);
  return {order.index_select(0, by_class), classes_sorted};
}

// What the walk decided: keep[i] says whether box order[i] (the i-th in NMS order) is kept; key is the sort key of
// each box (input order).
struct NmsBitmaskResult {
  at::Tensor order, keep;
  NmsSortKey key;
};

// The boxes the kernels walk: the first min(n, *row_limit) in sorted order (all n when row_limit is null). A
// device-side bound: the grid and the loops are sized for n, and the rows past the bound cost an early return.
FRCNN_INLINE int64_t nms_live_rows(int64_t n, const int64_t* row_limit) {
  return row_limit == nullptr || *row_limit >= n ? n : (*row_limit < 0 ? 0 : *row_limit);
}

// The bitmask NMS on any device. `Kernels` supplies the device's three steps:
//   static NmsSortKey sort_key(const at::Tensor& scores, const at::Tensor* classes);   // see NmsSortKey
//   template <typename scalar_t> static void build_mask(int64_t n, int64_t row_begin, int64_t rows,
//       int64_t col_blocks, const scalar_t* boxes, const int64_t* classes, at::opmath_type<scalar_t> threshold,
//       uint64_t* mask, const int64_t* num_kept, int64_t max_keep, const int64_t* row_limit);
//                                     // rows of the chunk; nothing once max_keep boxes are kept (read on the
//                                     // device), nothing for rows or columns past nms_live_rows
//   static void reduce(int64_t n, int64_t row_begin, int64_t rows, int64_t col_blocks, const uint64_t* mask,
//       const int64_t* classes, uint64_t* removed, bool* keep, int64_t* num_kept, int64_t max_keep,
//       const int64_t* row_limit);    // the walk over the chunk's live rows
// chunk_rows > 0 (a multiple of 64) sets the rows of mask built at once (tests use it to force chunking); 0: as
// many as fit kNmsMaskBudgetBytes. valid (bool [n], optional): boxes where it is false are neither kept nor
// suppress any other; they are sorted after every valid box (a stable sort on the flag) and the kernels stop at the
// count of valid boxes, read on the device, so they cost nothing whatever their number. Nothing here waits for the
// device.
template <typename Kernels>
NmsBitmaskResult nms_bitmask_keep_sorted(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor* idxs,
                                         double iou_threshold, int64_t max_keep, int64_t chunk_rows,
                                         const at::Tensor* valid = nullptr) {
  const int64_t n = boxes.size(0);
  const at::Tensor classes = idxs != nullptr ? idxs->to(at::kLong).contiguous() : at::Tensor();
  const NmsSortKey key = Kernels::sort_key(scores, idxs != nullptr ? &classes : nullptr);
  // (Not a structured binding: the dispatch lambda below captures these, which nvcc's front end may not accept.)
  std::pair<at::Tensor, at::Tensor> sorted = nms_sort_order(key, idxs != nullptr ? &classes : nullptr);
  at::Tensor row_limit;
  if (valid != nullptr) {
    const at::Tensor invalid = valid->logical_not().index_select(0, sorted.first);
    const at::Tensor valid_first = std::get<1>(invalid.to(at::kByte).sort(/*stable=*/true, 0, false));
    sorted.first = sorted.first.index_select(0, valid_first);
    if (idxs != nullptr) sorted.second = sorted.second.index_select(0, valid_first);
    row_limit = valid->sum(at::kLong);  // a 0-dim tensor on the device: no host read
  }
  const int64_t* row_limit_ptr = valid != nullptr ? row_limit.data_ptr<int64_t>() : nullptr;
  const at::Tensor& order = sorted.first;
  const at::Tensor& classes_sorted = sorted.second;
  const at::Tensor boxes_sorted = boxes.index_select(0, order).contiguous();

  const int64_t col_blocks = (n + kNmsBlockBoxes - 1) / kNmsBlockBoxes;
  if (chunk_rows <= 0) {
    const int64_t bytes_per_row_block = kNmsBlockBoxes * col_blocks * static_cast<int64_t>(sizeof(uint64_t));
    // 65535: the largest grid y of a CUDA launch.
    const int64_t row_blocks = std::min({col_blocks, int64_t{65535}, kNmsMaskBudgetBytes / bytes_per_row_block});
    chunk_rows = kNmsBlockBoxes * std::max<int64_t>(1, row_blocks);
  }
  chunk_rows = std::min(chunk_rows, col_blocks * kNmsBlockBoxes);
  const auto long_opts = boxes.options().dtype(at::kLong);
  at::Tensor mask = at::empty({chunk_rows * col_blocks}, long_opts);
  at::Tensor removed = at::zeros({col_blocks}, long_opts);
  at::Tensor num_kept = at::zeros({1}, long_opts);
  at::Tensor keep = at::zeros({n}, boxes.options().dtype(at::kBool));
  // batched: the walk runs in class order, so the top max_keep by score are only known after the merge.
  const int64_t walk_max_keep = idxs != nullptr ? -1 : max_keep;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "nms_bitmask", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t threshold = iou_threshold_as<acc_t>(iou_threshold);
    auto* mask_words = reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>());
    for (int64_t row_begin = 0; row_begin < n; row_begin += chunk_rows) {
      const int64_t rows = std::min(chunk_rows, n - row_begin);
      const int64_t* sorted_classes = idxs != nullptr ? classes_sorted.data_ptr<int64_t>() : nullptr;
      Kernels::template build_mask<scalar_t>(n, row_begin, rows, col_blocks, boxes_sorted.data_ptr<scalar_t>(),
                                             sorted_classes, threshold, mask_words, num_kept.data_ptr<int64_t>(),
                                             walk_max_keep, row_limit_ptr);
      Kernels::reduce(n, row_begin, rows, col_blocks, mask_words, sorted_classes,
                      reinterpret_cast<uint64_t*>(removed.data_ptr<int64_t>()), keep.data_ptr<bool>(),
                      num_kept.data_ptr<int64_t>(), walk_max_keep, row_limit_ptr);
    }
  });
  return {order, keep, key};
}

// The kept indices from nms_bitmask_keep_sorted, by decreasing score (ties: lower index), at most max_keep (< 0:
// all). On CUDA, the masked_select is the one host sync: the output's size.
inline at::Tensor nms_kept_indices(const NmsBitmaskResult& r, bool batched, int64_t max_keep) {
  at::Tensor kept = r.order.masked_select(r.keep);
  if (batched && kept.numel() > 1) {
    // Back to score order across classes (kept is grouped by class). With a class key, the score key is its low
    // half (offset back to int32).
    auto score_key = [&](const at::Tensor& boxes) {
      const at::Tensor key = r.key.key.index_select(0, boxes);
      return r.key.has_class ? key.bitwise_and(int64_t{0xFFFFFFFF}) - int64_t{0x80000000} : key;
    };
    if (r.key.has_class && r.order.size(0) <= INT32_MAX) {  // one sort of (score key << 32) + index
      kept = std::get<0>((score_key(kept) * (int64_t{1} << 32) + kept).sort()).bitwise_and(int64_t{0xFFFFFFFF});
    } else {  // by index, then stably by the score key
      kept = std::get<0>(kept.sort());
      kept = kept.index_select(0, std::get<1>(score_key(kept).sort(/*stable=*/true, 0, false)));
    }
    if (max_keep >= 0 && kept.numel() > max_keep) kept = kept.slice(0, 0, max_keep);
  }
  return kept;
}

}  // namespace fasterrcnn_ext

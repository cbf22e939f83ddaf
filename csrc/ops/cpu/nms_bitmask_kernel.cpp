// CPU kernel of the private op _nms_bitmask: the CUDA NMS (common/nms_bitmask.h) run serially, so the CPU tests
// check its steps against nms and batched_nms. Not a fast path: the CPU's own NMS (nms_kernel.cpp) is much faster.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops/common/checks.h"
#include "ops/common/nms_bitmask.h"

namespace fasterrcnn_ext {
namespace {

struct SerialBitmaskKernels {
  static NmsSortKey sort_key(const at::Tensor& scores, const at::Tensor* classes) {
    const at::Tensor s = scores.contiguous();
    const int64_t n = s.size(0);
    const NmsSortKey result = nms_empty_sort_key(s, classes != nullptr);
    const at::Tensor& key = result.key;
    const bool has_class = result.has_class, key32 = key.scalar_type() == at::kInt;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "nms_sort_key", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* in = s.data_ptr<scalar_t>();
      const int64_t* cls = has_class ? classes->data_ptr<int64_t>() : nullptr;
      at::parallel_for(0, n, 4096, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          const acc_t score = static_cast<acc_t>(in[i]);
          if (has_class) {
            key.data_ptr<int64_t>()[i] = nms_class_order_key(static_cast<float>(score), cls[i]);
          } else if (key32) {
            key.data_ptr<int32_t>()[i] = nms_order_key32(static_cast<float>(score));
          } else {
            key.data_ptr<int64_t>()[i] = nms_order_key(score);
          }
        }
      });
    });
    return result;
  }

  // One "thread block" per (row block, column block) pair of the chunk, as the CUDA grid.
  template <typename scalar_t>
  static void build_mask(int64_t n, int64_t row_begin, int64_t rows, int64_t col_blocks, const scalar_t* boxes,
                         const int64_t* classes, at::opmath_type<scalar_t> threshold, uint64_t* mask,
                         const int64_t* num_kept, int64_t max_keep, const int64_t* row_limit) {
    using acc_t = at::opmath_type<scalar_t>;
    if (max_keep >= 0 && *num_kept >= max_keep) return;  // an earlier chunk kept enough: this one is never walked
    n = nms_live_rows(n, row_limit);
    const int64_t first_row_block = row_begin / kNmsBlockBoxes;
    const int64_t row_blocks = (rows + kNmsBlockBoxes - 1) / kNmsBlockBoxes;
    for (int64_t rb = first_row_block; rb < first_row_block + row_blocks; ++rb) {
      const int64_t row_start = rb * kNmsBlockBoxes;
      if (row_start >= n) break;  // past the live rows: never walked
      const int row_size = static_cast<int>(std::min<int64_t>(n - row_start, kNmsBlockBoxes));
      for (int64_t cb = rb; cb < col_blocks; ++cb) {  // below the diagonal: never read
        const int64_t col_start = cb * kNmsBlockBoxes;
        if (col_start >= n) break;  // past the live columns: never read
        const int col_size = static_cast<int>(std::min<int64_t>(n - col_start, kNmsBlockBoxes));
        const bool meet = nms_blocks_share_a_class(classes, row_start, row_size, col_start);
        NmsBox<acc_t> cols[kNmsBlockBoxes];
        for (int k = 0; meet && k < col_size; ++k) cols[k] = nms_load_box<scalar_t>(boxes, classes, col_start + k);
        for (int t = 0; t < row_size; ++t) {
          const int first = rb == cb ? t + 1 : 0;
          mask[(row_start + t - row_begin) * col_blocks + cb] =
              meet ? nms_mask_word(nms_load_box<scalar_t>(boxes, classes, row_start + t), cols, first, col_size,
                                   threshold)
                   : 0;
        }
      }
    }
  }

  static void reduce(int64_t n, int64_t row_begin, int64_t rows, int64_t col_blocks, const uint64_t* mask,
                     const int64_t* classes, uint64_t* removed, bool* keep, int64_t* num_kept, int64_t max_keep,
                     const int64_t* row_limit) {
    n = nms_live_rows(n, row_limit);
    const int64_t live_blocks = (n + kNmsBlockBoxes - 1) / kNmsBlockBoxes;
    const int64_t first_block = row_begin / kNmsBlockBoxes;
    const int64_t end_block = std::min((row_begin + rows + kNmsBlockBoxes - 1) / kNmsBlockBoxes, live_blocks);
    for (int64_t blk = first_block; blk < end_block; ++blk) {
      if (max_keep >= 0 && *num_kept >= max_keep) break;
      const int64_t start = blk * kNmsBlockBoxes;
      const int size = static_cast<int>(std::min<int64_t>(n - start, kNmsBlockBoxes));
      const uint64_t* block_rows = mask + (start - row_begin) * col_blocks;
      uint64_t diag[kNmsBlockBoxes];
      for (int k = 0; k < size; ++k) diag[k] = block_rows[k * col_blocks + blk];
      const uint64_t kept_bits = nms_walk_block(removed[blk], diag, size, num_kept, max_keep);
      int kept_rows[kNmsBlockBoxes];
      for (int k = 0; k < size; ++k) {
        keep[start + k] = (kept_bits >> k) & 1;
        if (keep[start + k]) kept_rows[nms_kept_rank(kept_bits, k)] = k;
      }
      // Column blocks past the block's last class are never suppressed by it (nor is any later one). Each word is
      // the OR of its group's lane words, as the CUDA warp's shuffles combine them.
      const int kept = popcount64(kept_bits), group = nms_or_group_size(kept);
      for (int64_t c = blk + 1; c < live_blocks && nms_blocks_share_a_class(classes, start, size, c * kNmsBlockBoxes);
           ++c) {
        for (int slot = 0; slot < group; ++slot) {
          removed[c] |= nms_kept_rows_slot_word(block_rows, col_blocks, kept_rows, kept, slot, group, c);
        }
      }
    }
  }
};

at::Tensor nms_bitmask_cpu(const at::Tensor& boxes, const at::Tensor& scores, const std::optional<at::Tensor>& idxs,
                           double iou_threshold, int64_t max_keep, int64_t chunk_rows,
                           const std::optional<at::Tensor>& valid) {
  const at::Tensor* classes = idxs.has_value() ? &*idxs : nullptr;
  check_nms_inputs(boxes, scores, classes, "_nms_bitmask");
  check_nms_chunk_rows(chunk_rows, kNmsBlockBoxes, "_nms_bitmask");
  if (valid.has_value()) check_nms_valid(*valid, boxes, "_nms_bitmask");
  if (boxes.size(0) == 0 || max_keep == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const NmsBitmaskResult r = nms_bitmask_keep_sorted<SerialBitmaskKernels>(
      boxes, scores, classes, iou_threshold, max_keep, chunk_rows, valid.has_value() ? &*valid : nullptr);
  return nms_kept_indices(r, classes != nullptr, max_keep);
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, CPU, m) {
  m.impl("_nms_bitmask", &fasterrcnn_ext::nms_bitmask_cpu);
}

// CUDA kernels of nms and batched_nms.
//
// The classic 64-box bitmask scheme, with its steps in common/nms_bitmask.h (shared with a serial CPU run that the
// CPU tests check): one thread per box of a 64-row block compares it with 64 column boxes and writes a 64-bit mask
// word of the ones it suppresses; the greedy walk over the masks then runs on the GPU in one block (no copy of the
// mask to the host). Differences from torchvision:
//  - int64 sizes and offsets; the mask is built and walked in chunks of rows so 10^6 boxes do not need a
//    terabyte-sized mask;
//  - a class-aware variant: boxes sorted by (class, score) and only same-class pairs compared, skipping blocks
//    whose class ranges cannot meet;
//  - an early exit after max_keep kept boxes (the walk, and the mask of later chunks);
//  - a bound read on the device: with valid flags (_batched_nms_keep_mask_valid), the invalid boxes are sorted last
//    and neither the mask nor the walk goes past the valid count, so a static-size caller pays for valid boxes only;
//  - the kept rows of a block ORed into later columns by warp shuffles;
//  - one sort: 32-bit score keys, or for batched NMS one 64-bit (class, score) key;
//  - the IoU is the shared box_math.h function in float32 (float64 for double), the same as the CPU kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "ops/common/checks.h"
#include "ops/common/nms_bitmask.h"

namespace fasterrcnn_ext {
namespace {

// The sort key of each box (common/nms_bitmask.h NmsSortKey): int32 score keys, int64 (class, score) keys, or for
// double scores int64 score keys.
template <typename scalar_t, typename key_t>
__global__ void nms_sort_key_kernel(int64_t n, const scalar_t* __restrict__ scores,
                                    const int64_t* __restrict__ classes, key_t* __restrict__ key) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const acc_t score = static_cast<acc_t>(scores[i]);
  if constexpr (std::is_same_v<key_t, int32_t>) {
    key[i] = nms_order_key32(static_cast<float>(score));
  } else if constexpr (std::is_same_v<acc_t, double>) {
    key[i] = nms_order_key(score);
  } else {
    key[i] = nms_class_order_key(static_cast<float>(score), classes[i]);
  }
}

// Blocks of 64 threads over the (row block, column block) pairs of the chunk, grid-stride in both directions (the
// grid is capped at kNmsMaskGridCap per side); thread t writes row t's word. The loops stop at the live boxes
// (nms_live_rows, read on the device), so a launch sized for many boxes of which few are live costs little more
// than its capped grid.
constexpr int64_t kNmsMaskGridCap = 128;

template <typename scalar_t>
__global__ void nms_mask_kernel(int64_t n, int64_t row_begin, int64_t rows, int64_t col_blocks,
                                const scalar_t* __restrict__ boxes,   // [n, 4], sorted
                                const int64_t* __restrict__ classes,  // [n] sorted, or nullptr
                                at::opmath_type<scalar_t> threshold, uint64_t* __restrict__ mask,
                                const int64_t* __restrict__ num_kept, int64_t max_keep,
                                const int64_t* __restrict__ row_limit) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ NmsBox<acc_t> cols[kNmsBlockBoxes];
  if (max_keep >= 0 && *num_kept >= max_keep) return;  // an earlier chunk kept enough: this one is never walked
  n = nms_live_rows(n, row_limit);
  const int64_t chunk_row_blocks = (rows + kNmsBlockBoxes - 1) / kNmsBlockBoxes;
  // rb, col_block, the sizes and the class test are the same in every thread of the block: no barrier is skipped.
  for (int64_t rb = blockIdx.y; rb < chunk_row_blocks; rb += gridDim.y) {
    const int64_t row_block = row_begin / kNmsBlockBoxes + rb;
    const int64_t row_start = row_block * kNmsBlockBoxes;
    if (row_start >= n) break;  // past the live boxes: never walked
    const int row_size = static_cast<int>(min(n - row_start, int64_t{kNmsBlockBoxes}));
    for (int64_t col_block = blockIdx.x; col_block < col_blocks; col_block += gridDim.x) {
      if (col_block < row_block) continue;  // below the diagonal: never read
      const int64_t col_start = col_block * kNmsBlockBoxes;
      if (col_start >= n) break;  // past the live boxes: never read
      const int col_size = static_cast<int>(min(n - col_start, int64_t{kNmsBlockBoxes}));
      uint64_t* out = mask + (rb * kNmsBlockBoxes + threadIdx.x) * col_blocks + col_block;
      if (!nms_blocks_share_a_class(classes, row_start, row_size, col_start)) {
        if (threadIdx.x < row_size) *out = 0;
        continue;
      }
      __syncthreads();  // the previous pair's reads of cols are done
      if (threadIdx.x < col_size) cols[threadIdx.x] = nms_load_box<scalar_t>(boxes, classes, col_start + threadIdx.x);
      __syncthreads();
      if (threadIdx.x < row_size) {
        const int first = row_block == col_block ? static_cast<int>(threadIdx.x) + 1 : 0;
        *out = nms_mask_word(nms_load_box<scalar_t>(boxes, classes, row_start + threadIdx.x), cols, first, col_size,
                             threshold);
      }
    }
  }
}

// The greedy walk over rows [row_begin, row_begin + rows) of the mask, in one block. `removed` (one bit per box) and
// `num_kept` carry over from chunk to chunk.
//
// Per 64-box block, a few round trips instead of one per kept box: the block's 64 diagonal words and its removed
// word are loaded into shared memory at once; every thread then walks the block from shared memory (the same walk,
// so all take the same branches and know the kept bits without another barrier); and the kept rows are ORed into the
// later blocks' removed words by groups of lanes, each lane loading one or two kept rows' words of one column at
// once and a butterfly of warp shuffles combining them (__reduce_or_sync is 32-bit and whole-mask only; these words
// are 64-bit and the groups 1 to 32 lanes, the kept count rounded up to a power of 2). A dependent global load per
// kept box was the largest part of NMS time on an H100. With kSharedRemoved the removed words live in shared memory
// for the whole chunk (loaded once, stored once), so the per-block OR is a shared read-modify-write instead of a
// global one; batched_nms stops at the first column block past the block's last class.
template <bool kSharedRemoved>
__global__ void __launch_bounds__(256)
    nms_reduce_kernel(int64_t n, int64_t row_begin, int64_t rows, int64_t col_blocks,
                      const uint64_t* __restrict__ mask, const int64_t* __restrict__ classes,
                      uint64_t* __restrict__ removed_global, bool* __restrict__ keep, int64_t* __restrict__ num_kept,
                      int64_t max_keep, const int64_t* __restrict__ row_limit) {
  extern __shared__ uint64_t removed_shared[];
  __shared__ uint64_t diag[kNmsBlockBoxes];
  __shared__ uint64_t block_removed;
  __shared__ int kept_rows[kNmsBlockBoxes];
  uint64_t* removed = kSharedRemoved ? removed_shared : removed_global;
  if (kSharedRemoved) {
    for (int64_t c = threadIdx.x; c < col_blocks; c += blockDim.x) removed_shared[c] = removed_global[c];
  }
  constexpr unsigned kFullWarp = 0xffffffffu;  // blockDim.x is a multiple of 32: every warp is whole
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  const int warps = static_cast<int>(blockDim.x / 32);
  int64_t kept = *num_kept;  // every thread keeps the same count: they all walk the same bits
  n = nms_live_rows(n, row_limit);  // the same in every thread
  const int64_t live_blocks = (n + kNmsBlockBoxes - 1) / kNmsBlockBoxes;
  const int64_t first_block = row_begin / kNmsBlockBoxes;
  const int64_t end_block = min((row_begin + rows + kNmsBlockBoxes - 1) / kNmsBlockBoxes, live_blocks);
  for (int64_t blk = first_block; blk < end_block; ++blk) {
    if (max_keep >= 0 && kept >= max_keep) break;  // the same in every thread: no barrier is skipped by some only
    const int64_t start = blk * kNmsBlockBoxes;
    const int size = static_cast<int>(min(n - start, int64_t{kNmsBlockBoxes}));
    const uint64_t* block_rows = mask + (start - row_begin) * col_blocks;
    // The previous block's reads of diag and kept_rows and its writes to removed[] (this block's word among them)
    // are done.
    __syncthreads();
    if (threadIdx.x < size) diag[threadIdx.x] = block_rows[threadIdx.x * col_blocks + blk];
    if (threadIdx.x == 0) block_removed = removed[blk];
    __syncthreads();
    const uint64_t kept_bits = nms_walk_block(block_removed, diag, size, &kept, max_keep);
    if (kept_bits == 0) continue;  // the same in every thread
    if (threadIdx.x < size && ((kept_bits >> threadIdx.x) & 1)) {
      keep[start + threadIdx.x] = true;
      kept_rows[nms_kept_rank(kept_bits, static_cast<int>(threadIdx.x))] = static_cast<int>(threadIdx.x);
    }
    __syncthreads();  // kept_rows is complete
    const int kept_in_block = popcount64(kept_bits), group = nms_or_group_size(kept_in_block);
    const int slot = lane % group, columns_per_warp = 32 / group;
    // c0 is the same in every lane of a warp, so each warp's lanes run the shuffles together; a group past the last
    // column (or the block's last class) contributes nothing and writes nothing.
    for (int64_t c0 = blk + 1 + static_cast<int64_t>(warp) * columns_per_warp;;
         c0 += static_cast<int64_t>(warps) * columns_per_warp) {
      const int64_t c = c0 + lane / group;
      const bool active = c < live_blocks && nms_blocks_share_a_class(classes, start, size, c * kNmsBlockBoxes);
      if (!__any_sync(kFullWarp, active)) break;  // no later column of this warp is active either
      uint64_t word =
          active ? nms_kept_rows_slot_word(block_rows, col_blocks, kept_rows, kept_in_block, slot, group, c) : 0;
      for (int offset = group / 2; offset > 0; offset /= 2) word |= __shfl_xor_sync(kFullWarp, word, offset);
      if (active && slot == 0) removed[c] |= word;
    }
  }
  __syncthreads();  // every thread has read *num_kept and written its removed words
  if (kSharedRemoved) {
    for (int64_t c = threadIdx.x; c < col_blocks; c += blockDim.x) removed_global[c] = removed_shared[c];
  }
  if (threadIdx.x == 0) *num_kept = kept;
}

// Up to this many removed words (32 KB: 262,144 boxes) the walk keeps them in shared memory.
constexpr int64_t kNmsSharedRemovedWords = 4096;

struct CudaBitmaskKernels {
  static NmsSortKey sort_key(const at::Tensor& scores, const at::Tensor* classes) {
    const at::Tensor s = scores.contiguous();
    const int64_t n = s.size(0);
    const NmsSortKey result = nms_empty_sort_key(s, classes != nullptr);
    const at::Tensor& key = result.key;
    const bool key32 = key.scalar_type() == at::kInt;
    constexpr int kThreads = 256;
    const auto blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int64_t* cls = result.has_class ? classes->data_ptr<int64_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "nms_sort_key", [&] {
      if (key32) {
        nms_sort_key_kernel<scalar_t, int32_t><<<blocks, kThreads, 0, stream>>>(n, s.data_ptr<scalar_t>(), cls,
                                                                                key.data_ptr<int32_t>());
      } else {
        nms_sort_key_kernel<scalar_t, int64_t><<<blocks, kThreads, 0, stream>>>(n, s.data_ptr<scalar_t>(), cls,
                                                                                key.data_ptr<int64_t>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return result;
  }

  template <typename scalar_t>
  static void build_mask(int64_t n, int64_t row_begin, int64_t rows, int64_t col_blocks, const scalar_t* boxes,
                         const int64_t* classes, at::opmath_type<scalar_t> threshold, uint64_t* mask,
                         const int64_t* num_kept, int64_t max_keep, const int64_t* row_limit) {
    const dim3 grid(static_cast<unsigned>(std::min(col_blocks, kNmsMaskGridCap)),
                    static_cast<unsigned>(std::min((rows + kNmsBlockBoxes - 1) / kNmsBlockBoxes, kNmsMaskGridCap)));
    nms_mask_kernel<scalar_t><<<grid, kNmsBlockBoxes, 0, at::cuda::getCurrentCUDAStream()>>>(
        n, row_begin, rows, col_blocks, boxes, classes, threshold, mask, num_kept, max_keep, row_limit);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void reduce(int64_t n, int64_t row_begin, int64_t rows, int64_t col_blocks, const uint64_t* mask,
                     const int64_t* classes, uint64_t* removed, bool* keep, int64_t* num_kept, int64_t max_keep,
                     const int64_t* row_limit) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (col_blocks <= kNmsSharedRemovedWords) {
      const size_t shared = static_cast<size_t>(col_blocks) * sizeof(uint64_t);
      nms_reduce_kernel<true><<<1, 256, shared, stream>>>(n, row_begin, rows, col_blocks, mask, classes, removed,
                                                          keep, num_kept, max_keep, row_limit);
    } else {
      nms_reduce_kernel<false><<<1, 256, 0, stream>>>(n, row_begin, rows, col_blocks, mask, classes, removed, keep,
                                                      num_kept, max_keep, row_limit);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

NmsBitmaskResult nms_keep_sorted(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor* idxs,
                                 double iou_threshold, int64_t max_keep, int64_t chunk_rows = 0,
                                 const at::Tensor* valid = nullptr) {
  const c10::cuda::CUDAGuard guard(boxes.device());
  return nms_bitmask_keep_sorted<CudaBitmaskKernels>(boxes, scores, idxs, iou_threshold, max_keep, chunk_rows,
                                                     valid);
}

at::Tensor nms_cuda_common(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor* idxs,
                           double iou_threshold, int64_t max_keep, const char* op, int64_t chunk_rows = 0,
                           const at::Tensor* valid = nullptr) {
  check_nms_inputs(boxes, scores, idxs, op);
  check_cuda(boxes, "boxes", op);
  if (valid != nullptr) check_nms_valid(*valid, boxes, op);
  if (boxes.size(0) == 0 || max_keep == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const NmsBitmaskResult r = nms_keep_sorted(boxes, scores, idxs, iou_threshold, max_keep, chunk_rows, valid);
  return nms_kept_indices(r, idxs != nullptr, max_keep);  // the one host sync: the output size
}

// The keep mask in input order, scattered back on the device; boxes where valid is false (when given) are never kept.
at::Tensor keep_mask_cuda(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                          const at::Tensor* valid, double iou_threshold, const char* op) {
  check_nms_inputs(boxes, scores, &idxs, op);
  check_cuda(boxes, "boxes", op);
  if (valid != nullptr) check_nms_valid(*valid, boxes, op);
  at::Tensor out = at::zeros({boxes.size(0)}, boxes.options().dtype(at::kBool));
  if (boxes.size(0) == 0) return out;
  const NmsBitmaskResult r = nms_keep_sorted(boxes, scores, &idxs, iou_threshold, -1, 0, valid);
  return out.index_copy_(0, r.order, r.keep);
}

at::Tensor batched_nms_keep_mask_cuda(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                                      double iou_threshold) {
  return keep_mask_cuda(boxes, scores, idxs, nullptr, iou_threshold, "batched_nms_keep_mask");
}

at::Tensor batched_nms_keep_mask_valid_cuda(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                                            const at::Tensor& valid, double iou_threshold) {
  return keep_mask_cuda(boxes, scores, idxs, &valid, iou_threshold, "_batched_nms_keep_mask_valid");
}

at::Tensor nms_cuda(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold, int64_t max_keep) {
  return nms_cuda_common(dets, scores, nullptr, iou_threshold, max_keep, "nms");
}

at::Tensor batched_nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                            double iou_threshold, int64_t max_keep) {
  return nms_cuda_common(boxes, scores, &idxs, iou_threshold, max_keep, "batched_nms");
}

at::Tensor nms_bitmask_cuda(const at::Tensor& boxes, const at::Tensor& scores, const std::optional<at::Tensor>& idxs,
                            double iou_threshold, int64_t max_keep, int64_t chunk_rows,
                            const std::optional<at::Tensor>& valid) {
  check_nms_chunk_rows(chunk_rows, kNmsBlockBoxes, "_nms_bitmask");
  return nms_cuda_common(boxes, scores, idxs.has_value() ? &*idxs : nullptr, iou_threshold, max_keep, "_nms_bitmask",
                         chunk_rows, valid.has_value() ? &*valid : nullptr);
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, CUDA, m) {
  m.impl("nms", &fasterrcnn_ext::nms_cuda);
  m.impl("batched_nms", &fasterrcnn_ext::batched_nms_cuda);
  m.impl("batched_nms_keep_mask", &fasterrcnn_ext::batched_nms_keep_mask_cuda);
  m.impl("_batched_nms_keep_mask_valid", &fasterrcnn_ext::batched_nms_keep_mask_valid_cuda);
  m.impl("_nms_bitmask", &fasterrcnn_ext::nms_bitmask_cuda);
}

// CUDA kernels of nms and batched_nms.
//
// The classic 64-box bitmask scheme: one thread per box of a 64-row block compares it with 64 column boxes and
// writes a 64-bit mask of the ones it overlaps. The greedy pass over the masks then runs on the GPU in one block
// (no copy of the mask to the host). Differences from torchvision:
//  - int64 sizes and offsets; the mask is built and reduced in chunks of rows so 10^6 boxes do not need a
//    terabyte-sized mask;
//  - a class-aware variant: boxes sorted by (class, score) and only same-class pairs compared, skipping blocks
//    whose class ranges cannot meet;
//  - an early exit after max_keep kept boxes;
//  - the IoU is the shared box_math.h function in float32 (float64 for double), the same as the CPU kernel.
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

constexpr int kBlockBoxes = 64;  // boxes per mask word
// Rows of the mask built at once: bounds its memory to kMaskBudgetBytes whatever the number of boxes.
constexpr int64_t kMaskBudgetBytes = int64_t{256} << 20;

template <typename scalar_t>
__global__ void nms_mask_kernel(int64_t n, int64_t row_begin, int64_t col_blocks,
                                const scalar_t* __restrict__ boxes,       // [n, 4], sorted
                                const int64_t* __restrict__ classes,      // [n] sorted, or nullptr
                                at::opmath_type<scalar_t> threshold, uint64_t* __restrict__ mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row_block = row_begin / kBlockBoxes + blockIdx.y;
  const int64_t col_block = blockIdx.x;
  if (col_block < row_block) return;  // below the diagonal: never read
  const int64_t row_start = row_block * kBlockBoxes;
  const int64_t col_start = col_block * kBlockBoxes;
  const int row_size = static_cast<int>(min(n - row_start, int64_t{kBlockBoxes}));
  const int col_size = static_cast<int>(min(n - col_start, int64_t{kBlockBoxes}));
  uint64_t* out = mask + (static_cast<int64_t>(blockIdx.y) * kBlockBoxes + threadIdx.x) * col_blocks + col_block;

  // Sorted by class: if the column block's first class is past the row block's last, nothing overlaps.
  if (classes != nullptr && classes[col_start] > classes[row_start + row_size - 1]) {
    if (threadIdx.x < row_size) *out = 0;
    return;
  }

  __shared__ acc_t cb[kBlockBoxes][5];
  __shared__ int64_t ccls[kBlockBoxes];
  if (threadIdx.x < col_size) {
    const scalar_t* p = boxes + 4 * (col_start + threadIdx.x);
    const acc_t x1 = p[0], y1 = p[1], x2 = p[2], y2 = p[3];
    cb[threadIdx.x][0] = x1;
    cb[threadIdx.x][1] = y1;
    cb[threadIdx.x][2] = x2;
    cb[threadIdx.x][3] = y2;
    cb[threadIdx.x][4] = box_area(x1, y1, x2, y2);
    ccls[threadIdx.x] = classes != nullptr ? classes[col_start + threadIdx.x] : 0;
  }
  __syncthreads();
  if (threadIdx.x >= row_size) return;

  const int64_t i = row_start + threadIdx.x;
  const scalar_t* p = boxes + 4 * i;
  const acc_t x1 = p[0], y1 = p[1], x2 = p[2], y2 = p[3];
  const acc_t area = box_area(x1, y1, x2, y2);
  const int64_t cls = classes != nullptr ? classes[i] : 0;
  uint64_t bits = 0;
  const int first = row_block == col_block ? threadIdx.x + 1 : 0;
  for (int k = first; k < col_size; ++k) {
    if (ccls[k] == cls &&
        box_iou(x1, y1, x2, y2, area, cb[k][0], cb[k][1], cb[k][2], cb[k][3], cb[k][4]) > threshold) {
      bits |= uint64_t{1} << k;
    }
  }
  *out = bits;
}

// The greedy pass over rows [row_begin, row_begin + rows) of the mask, in one block. `removed` (one bit per
// box) and `num_kept` persist across chunks.
//
// Every thread walks the same boxes and keeps its own copy of the current 64-box block's removed bits, updated
// from the (read-only) mask row of each kept box, so the walk needs no barrier per box and every thread takes the
// same branches. Only the bits of later blocks go through `removed`, each word written by one thread per kept
// box; the barrier before each block makes those writes visible before the block's word is read. (The previous
// version re-read the current block's word from `removed` after a barrier per kept box; on an H100 it hung from
// two blocks of boxes on.)
__global__ void nms_reduce_kernel(int64_t n, int64_t row_begin, int64_t rows, int64_t col_blocks,
                                  const uint64_t* __restrict__ mask, uint64_t* __restrict__ removed,
                                  bool* __restrict__ keep, int64_t* __restrict__ num_kept, int64_t max_keep) {
  __shared__ uint64_t block_bits;  // removed[blk], read once by thread 0 and shared
  // Read by every thread before thread 0 writes it back at the end: a barrier lies between, or the loop stopped at
  // once and the value written is the one read.
  int64_t kept = *num_kept;
  const int64_t first_block = row_begin / kBlockBoxes;
  const int64_t end_block = (row_begin + rows + kBlockBoxes - 1) / kBlockBoxes;
  for (int64_t blk = first_block; blk < end_block; ++blk) {
    if (max_keep >= 0 && kept >= max_keep) break;
    __syncthreads();  // the previous block's writes to removed[] are done (and block_bits was read by all)
    if (threadIdx.x == 0) block_bits = removed[blk];
    __syncthreads();
    uint64_t bits = block_bits;
    const int64_t start = blk * kBlockBoxes;
    const int size = static_cast<int>(min(n - start, int64_t{kBlockBoxes}));
    for (int k = 0; k < size; ++k) {
      if (bits & (uint64_t{1} << k)) continue;
      if (threadIdx.x == 0) keep[start + k] = true;
      ++kept;
      if (max_keep >= 0 && kept >= max_keep) break;
      const uint64_t* row = mask + (start + k - row_begin) * col_blocks;
      bits |= row[blk];
      for (int64_t c = blk + 1 + threadIdx.x; c < col_blocks; c += blockDim.x) removed[c] |= row[c];
    }
  }
  if (threadIdx.x == 0) *num_kept = kept;
}

// Sort order of the CPU kernel: score descending, NaN after every number, ties by lower index; batched: by class
// first. Built from stable sorts, last key first.
at::Tensor sort_order(const at::Tensor& scores, const at::Tensor* idxs) {
  // NaN sorts as -inf here; the stable sort on is_nan below then moves NaN after the real -inf scores.
  const at::Tensor s = at::where(scores.isnan(), -std::numeric_limits<double>::infinity(), scores);
  at::Tensor order = std::get<1>(s.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  const at::Tensor is_nan = scores.isnan().index_select(0, order).to(at::kByte);
  order = order.index_select(0, std::get<1>(is_nan.sort(/*stable=*/true, 0, false)));
  if (idxs != nullptr) {
    const at::Tensor cls = idxs->to(at::kLong).index_select(0, order);
    order = order.index_select(0, std::get<1>(cls.sort(/*stable=*/true, 0, false)));
  }
  return order;
}

// The bitmask NMS on the GPU: (order, keep), where keep[i] says whether the box order[i] (i-th in sort_order) is
// kept. Nothing here waits for the device.
std::pair<at::Tensor, at::Tensor> nms_keep_sorted(const at::Tensor& boxes, const at::Tensor& scores,
                                                  const at::Tensor* idxs, double iou_threshold, int64_t max_keep) {
  const int64_t n = boxes.size(0);
  const c10::cuda::CUDAGuard guard(boxes.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const at::Tensor order = sort_order(scores, idxs);
  const at::Tensor boxes_sorted = boxes.index_select(0, order).contiguous();
  at::Tensor classes_sorted;
  if (idxs != nullptr) classes_sorted = idxs->to(at::kLong).index_select(0, order).contiguous();

  const int64_t col_blocks = (n + kBlockBoxes - 1) / kBlockBoxes;
  const int64_t bytes_per_row_block = kBlockBoxes * col_blocks * static_cast<int64_t>(sizeof(uint64_t));
  const int64_t row_blocks_per_chunk =
      std::max<int64_t>(1, std::min<int64_t>(col_blocks, std::min<int64_t>(65535, kMaskBudgetBytes / bytes_per_row_block)));
  const int64_t chunk_rows = row_blocks_per_chunk * kBlockBoxes;
  at::Tensor mask = at::empty({chunk_rows * col_blocks}, boxes.options().dtype(at::kLong));
  at::Tensor removed = at::zeros({col_blocks}, boxes.options().dtype(at::kLong));
  at::Tensor num_kept = at::zeros({1}, boxes.options().dtype(at::kLong));
  at::Tensor keep = at::zeros({n}, boxes.options().dtype(at::kBool));

  // batched: the mask pass runs in class order, so the top max_keep by score are only known after the merge.
  const int64_t reduce_max_keep = idxs != nullptr ? -1 : max_keep;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "nms_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t threshold = iou_threshold_as<acc_t>(iou_threshold);
    for (int64_t row_begin = 0; row_begin < n; row_begin += chunk_rows) {
      const int64_t rows = std::min(chunk_rows, n - row_begin);
      const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>((rows + kBlockBoxes - 1) / kBlockBoxes));
      nms_mask_kernel<scalar_t><<<grid, kBlockBoxes, 0, stream>>>(
          n, row_begin, col_blocks, boxes_sorted.data_ptr<scalar_t>(),
          idxs != nullptr ? classes_sorted.data_ptr<int64_t>() : nullptr, threshold,
          reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      nms_reduce_kernel<<<1, 256, 0, stream>>>(n, row_begin, rows, col_blocks,
                                                reinterpret_cast<const uint64_t*>(mask.data_ptr<int64_t>()),
                                                reinterpret_cast<uint64_t*>(removed.data_ptr<int64_t>()),
                                                keep.data_ptr<bool>(), num_kept.data_ptr<int64_t>(), reduce_max_keep);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {order, keep};
}

at::Tensor nms_cuda_common(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor* idxs,
                           double iou_threshold, int64_t max_keep, const char* op) {
  check_nms_inputs(boxes, scores, idxs, op);
  check_cuda(boxes, "boxes", op);
  if (boxes.size(0) == 0 || max_keep == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const auto [order, keep] = nms_keep_sorted(boxes, scores, idxs, iou_threshold, max_keep);
  at::Tensor kept = order.masked_select(keep);  // the one host sync: the output size
  if (idxs != nullptr && kept.numel() > 1) {
    // Back to score order across classes (kept is grouped by class); ties by lower index.
    kept = std::get<0>(kept.sort());
    kept = kept.index_select(0, sort_order(scores.index_select(0, kept), nullptr));
    if (max_keep >= 0 && kept.numel() > max_keep) kept = kept.slice(0, 0, max_keep);
  }
  return kept;
}

at::Tensor batched_nms_keep_mask_cuda(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                                      double iou_threshold) {
  check_nms_inputs(boxes, scores, &idxs, "batched_nms_keep_mask");
  check_cuda(boxes, "boxes", "batched_nms_keep_mask");
  at::Tensor out = at::zeros({boxes.size(0)}, boxes.options().dtype(at::kBool));
  if (boxes.size(0) == 0) return out;
  const auto [order, keep] = nms_keep_sorted(boxes, scores, &idxs, iou_threshold, -1);
  return out.index_copy_(0, order, keep);  // scatter back to input order, on the device
}

at::Tensor nms_cuda(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold, int64_t max_keep) {
  return nms_cuda_common(dets, scores, nullptr, iou_threshold, max_keep, "nms");
}

at::Tensor batched_nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                            double iou_threshold, int64_t max_keep) {
  return nms_cuda_common(boxes, scores, &idxs, iou_threshold, max_keep, "batched_nms");
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_IMPL(fasterrcnn_ext, CUDA, m) {
  m.impl("nms", &fasterrcnn_ext::nms_cuda);
  m.impl("batched_nms", &fasterrcnn_ext::batched_nms_cuda);
  m.impl("batched_nms_keep_mask", &fasterrcnn_ext::batched_nms_keep_mask_cuda);
}

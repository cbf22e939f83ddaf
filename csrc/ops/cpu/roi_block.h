// Channel blocks: the CPU RoI kernels work on one block of channels of one image at a time, copied into a small
// [H][W][kBlock] buffer (64 bytes, one cache line, per pixel). Whatever the input layout (NCHW or channels-last),
// each bilinear tap or max-pool read is then one aligned vector, and the buffer (a few MB) stays in cache while
// every RoI of the image is pooled from it. Parallel work is one (image, channel block) per task, so the backward
// needs no atomics and accumulates every gradient value in RoI order, whatever the number of threads.
#pragma once

#include <ATen/ATen.h>

#include "ops/common/host_device.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fasterrcnn_ext {

template <typename acc_t>
constexpr int64_t kBlock = 64 / static_cast<int64_t>(sizeof(acc_t));

// Vector types of one block (64 bytes) for the in-register transpose below.
template <typename T>
struct BlockTypes;
template <>
struct BlockTypes<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t Mask __attribute__((vector_size(64)));
};
template <>
struct BlockTypes<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t Mask __attribute__((vector_size(64)));
};

// Interleaves B rows of B values (B = kBlock) into B pixels of B channels: an in-register transpose (Eklundh's
// algorithm: swap the off-diagonal halves of ever smaller blocks), B * log2(B) two-source shuffles instead of
// B * B scalar stores.
template <typename T>
__attribute__((always_inline)) inline void transpose_block_impl(const T* const* rows, int64_t x, T* out) {
  using V = typename BlockTypes<T>::V;
  using M = typename BlockTypes<T>::Mask;
  constexpr int B = static_cast<int>(kBlock<T>);
  V r[B];
  for (int i = 0; i < B; ++i) std::memcpy(&r[i], rows[i] + x, sizeof(V));
  for (int s = B / 2; s >= 1; s /= 2) {
    M lo, hi;  // indices into the concatenation (r[i], r[i + s])
    for (int j = 0; j < B; ++j) {
      lo[j] = (j & s) ? B + j - s : j;
      hi[j] = (j & s) ? B + j : j + s;
    }
    for (int i = 0; i < B; ++i) {
      if (i & s) continue;
      const V a = r[i], b = r[i + s];
      r[i] = __builtin_shuffle(a, b, lo);
      r[i + s] = __builtin_shuffle(a, b, hi);
    }
  }
  for (int i = 0; i < B; ++i) std::memcpy(out + i * B, &r[i], sizeof(V));
}

// One image row of a full block from NCHW planes: rows[c] points at channel c's row.
template <typename T>
__attribute__((always_inline)) inline void interleave_row_impl(const T* const* rows, int64_t width, T* out) {
  constexpr int64_t B = kBlock<T>;
  int64_t x = 0;
  for (; x + B <= width; x += B) transpose_block_impl(rows, x, out + x * B);
  for (; x < width; ++x) {
    for (int64_t c = 0; c < B; ++c) out[x * B + c] = rows[c][x];
  }
}
FRCNN_CPU_MULTIVERSION inline void interleave_row(const float* const* rows, int64_t width, float* out) {
  interleave_row_impl(rows, width, out);
}
FRCNN_CPU_MULTIVERSION inline void interleave_row(const double* const* rows, int64_t width, double* out) {
  interleave_row_impl(rows, width, out);
}

// Copies channels [c0, c0 + kBlock) of image n of `f` ([N, C, H, W], any strides) into buf as [H][W][kBlock] acc_t;
// channels past C are zero.
template <typename scalar_t, typename acc_t>
void gather_channel_block(const at::Tensor& f, int64_t n, int64_t c0, acc_t* buf) {
  constexpr int64_t B = kBlock<acc_t>;
  const int64_t C = f.size(1), H = f.size(2), W = f.size(3);
  const int64_t sC = f.stride(1), sH = f.stride(2), sW = f.stride(3);
  const scalar_t* base = f.data_ptr<scalar_t>() + n * f.stride(0) + c0 * sC;
  const int64_t nc = std::min(B, C - c0);
  if (nc < B) std::fill(buf, buf + H * W * B, acc_t(0));
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (nc == B && sW == 1) {  // NCHW rows of a full block: vector transpose
      const scalar_t* rows[B];
      for (int64_t y = 0; y < H; ++y) {
        for (int64_t c = 0; c < B; ++c) rows[c] = base + c * sC + y * sH;
        interleave_row(rows, W, buf + y * W * B);
      }
      return;
    }
  }
  for (int64_t y = 0; y < H; ++y) {
    acc_t* row = buf + y * W * B;
    if (sC == 1) {  // channels-last: each pixel's channels are contiguous
      for (int64_t x = 0; x < W; ++x) {
        const scalar_t* src = base + y * sH + x * sW;
        for (int64_t c = 0; c < nc; ++c) row[x * B + c] = static_cast<acc_t>(src[c]);
      }
    } else {  // NCHW: read each channel's row contiguously
      for (int64_t c = 0; c < nc; ++c) {
        const scalar_t* src = base + c * sC + y * sH;
        for (int64_t x = 0; x < W; ++x) row[x * B + c] = static_cast<acc_t>(src[x * sW]);
      }
    }
  }
}

// Writes buf ([H][W][kBlock]) back to channels [c0, c0 + kBlock) of image n of the NCHW-contiguous `out`.
template <typename scalar_t, typename acc_t>
void scatter_channel_block(const acc_t* buf, int64_t n, int64_t c0, at::Tensor& out) {
  constexpr int64_t B = kBlock<acc_t>;
  const int64_t C = out.size(1), HW = out.size(2) * out.size(3);
  scalar_t* base = out.data_ptr<scalar_t>() + (n * C + c0) * HW;
  const int64_t nc = std::min(B, C - c0);
  for (int64_t c = 0; c < nc; ++c) {
    scalar_t* dst = base + c * HW;
    for (int64_t i = 0; i < HW; ++i) dst[i] = static_cast<scalar_t>(buf[i * B + c]);
  }
}

// RoI ids grouped by image: ids[begin[n] .. begin[n + 1]) are the RoIs of image n, in RoI order.
struct RoIsByImage {
  std::vector<int64_t> ids, begin;
  RoIsByImage(const std::vector<int64_t>& batch_of_roi, int64_t batch) : ids(batch_of_roi.size()), begin(batch + 1, 0) {
    for (int64_t b : batch_of_roi) ++begin[b + 1];
    for (int64_t n = 0; n < batch; ++n) begin[n + 1] += begin[n];
    std::vector<int64_t> next(begin.begin(), begin.end() - 1);
    for (int64_t r = 0; r < static_cast<int64_t>(batch_of_roi.size()); ++r) ids[next[batch_of_roi[r]]++] = r;
  }
};

}  // namespace fasterrcnn_ext

// Channel blocks: the CPU RoI kernels work on one block of channels of one image at a time, copied into a small
// [H][W][kBlock] buffer (64 bytes, one cache line, per pixel). Whatever the input layout (NCHW or channels-last),
// each bilinear tap or max-pool read is then one cache line (two 32-byte vectors), and the buffer (a few MB) stays
// in cache while every RoI of the image is pooled from it. Parallel work is one (image, channel block) per task, so
// the backward needs no atomics and accumulates every gradient value in RoI order, whatever the number of threads.
#pragma once

#include <ATen/ATen.h>

#include "ops/common/host_device.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace fasterrcnn_ext {

template <typename acc_t>
constexpr int64_t kBlock = 64 / static_cast<int64_t>(sizeof(acc_t));

// The vector types of the RoI kernels: 32 bytes, one AVX2 register (two SSE ones; the AVX-512 clones run them as
// 256-bit AVX-512VL operations). GCC lowers wider vector types through the stack, with scalar code for shuffles
// and selects, in the AVX2 clones: 64-byte ones made the AVX2 RoI kernels 2x to 8x slower (BENCHMARKS.md).
constexpr int kVecBytes = 32;
template <typename T>
struct VecTypes;
template <>
struct VecTypes<float> {
  typedef float V __attribute__((vector_size(kVecBytes)));
  typedef int32_t Mask __attribute__((vector_size(kVecBytes)));
};
template <>
struct VecTypes<double> {
  typedef double V __attribute__((vector_size(kVecBytes)));
  typedef int64_t Mask __attribute__((vector_size(kVecBytes)));
};

// Transposes L rows of L values (L = values per kVecBytes vector: 8 float, 4 double) into L columns, in registers:
// row i is read at rows[i] + x, column j (the rows' values at x + j) is written at out + j * stride. Written with
// the fixed two-source shuffles that AVX has as single instructions (unpack, shufps, vperm2f128), as the classic
// 8x8 transpose: GCC turned the shuffles of Eklundh's algorithm into permute-and-blend sequences.
__attribute__((always_inline)) inline void transpose_tile(const float* const* rows, int64_t x, float* out,
                                                          int64_t stride) {
  using V = VecTypes<float>::V;
  static_assert(sizeof(V) == 8 * sizeof(float), "an 8x8 tile");
  V r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) std::memcpy(&r[i], rows[i] + x, sizeof(V));
  for (int i = 0; i < 8; i += 2) {  // unpacklo / unpackhi: [a0 b0 a1 b1 | a4 b4 a5 b5], [a2 b2 a3 b3 | a6 b6 a7 b7]
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {  // shufps: four rows' columns j | j + 4
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);      // columns 0 | 4
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);  // 1 | 5
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);  // 2 | 6
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);  // 3 | 7
  }
  for (int j = 0; j < 4; ++j) {  // vperm2f128: rows 0-3 and 4-7 of columns j and j + 4
    const V lo = __builtin_shufflevector(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    const V hi = __builtin_shufflevector(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    std::memcpy(out + j * stride, &lo, sizeof(V));
    std::memcpy(out + (j + 4) * stride, &hi, sizeof(V));
  }
}

__attribute__((always_inline)) inline void transpose_tile(const double* const* rows, int64_t x, double* out,
                                                          int64_t stride) {
  using V = VecTypes<double>::V;
  static_assert(sizeof(V) == 4 * sizeof(double), "a 4x4 tile");
  V r[4];
  for (int i = 0; i < 4; ++i) std::memcpy(&r[i], rows[i] + x, sizeof(V));
  const V t0 = __builtin_shufflevector(r[0], r[1], 0, 4, 2, 6), t1 = __builtin_shufflevector(r[0], r[1], 1, 5, 3, 7);
  const V t2 = __builtin_shufflevector(r[2], r[3], 0, 4, 2, 6), t3 = __builtin_shufflevector(r[2], r[3], 1, 5, 3, 7);
  const V c0 = __builtin_shufflevector(t0, t2, 0, 1, 4, 5), c2 = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
  const V c1 = __builtin_shufflevector(t1, t3, 0, 1, 4, 5), c3 = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
  std::memcpy(out, &c0, sizeof(V));
  std::memcpy(out + stride, &c1, sizeof(V));
  std::memcpy(out + 2 * stride, &c2, sizeof(V));
  std::memcpy(out + 3 * stride, &c3, sizeof(V));
}

// Copies `bytes` bytes to memory that is written once and not read again soon (the RoI ops' outputs, 50 MB for
// 1,000 RoIs): non-temporal stores write whole cache lines without first reading them in (a plain store reads
// each line it partly writes: twice the memory traffic) and without evicting the block buffer. Where dst or the
// size is not 16-byte aligned, an ordinary copy. Call stream_fence() before another thread reads dst.
inline void stream_store(const void* src, size_t bytes, void* dst) {
#if defined(__SSE2__)
  if (reinterpret_cast<uintptr_t>(dst) % 16 == 0 && bytes % 16 == 0) {
    const char* s = static_cast<const char*>(src);
    char* d = static_cast<char*>(dst);
    for (size_t i = 0; i < bytes; i += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    }
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

// Orders the non-temporal stores before whatever this thread does next (they are weakly ordered).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// One image row of a full block from NCHW planes: rows[c] points at channel c's row; pixel x goes to out + x * B.
template <typename T>
__attribute__((always_inline)) inline void interleave_row_impl(const T* const* rows, int64_t width, T* out) {
  constexpr int64_t B = kBlock<T>, L = kVecBytes / static_cast<int64_t>(sizeof(T));
  int64_t x = 0;
  for (; x + L <= width; x += L) {  // L pixels: B / L tiles of L channels
    for (int64_t c = 0; c < B; c += L) transpose_tile(rows + c, x, out + x * B + c, B);
  }
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

// The inverse: n pixels of a block (in + i * B) to the rows of its first nc channels (channel c's row at
// out + c * out_stride).
template <typename T>
__attribute__((always_inline)) inline void deinterleave_impl(const T* in, int64_t n, int64_t nc, T* out,
                                                             int64_t out_stride) {
  constexpr int64_t B = kBlock<T>, L = kVecBytes / static_cast<int64_t>(sizeof(T));
  int64_t i = 0;
  if (nc == B) {
    for (; i + L <= n; i += L) {
      const T* pixels[L];
      for (int64_t j = 0; j < L; ++j) pixels[j] = in + (i + j) * B;
      for (int64_t c = 0; c < B; c += L) transpose_tile(pixels, c, out + c * out_stride + i, out_stride);
    }
  }
  for (; i < n; ++i) {
    for (int64_t c = 0; c < nc; ++c) out[c * out_stride + i] = in[i * B + c];
  }
}
FRCNN_CPU_MULTIVERSION inline void deinterleave(const float* in, int64_t n, int64_t nc, float* out,
                                                int64_t out_stride) {
  deinterleave_impl(in, n, nc, out, out_stride);
}
FRCNN_CPU_MULTIVERSION inline void deinterleave(const double* in, int64_t n, int64_t nc, double* out,
                                                int64_t out_stride) {
  deinterleave_impl(in, n, nc, out, out_stride);
}

// deinterleave for any output type: n pixels of a block of acc_t to nc rows of scalar_t.
template <typename scalar_t, typename acc_t>
void store_block_rows(const acc_t* in, int64_t n, int64_t nc, scalar_t* out, int64_t out_stride) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    deinterleave(in, n, nc, out, out_stride);
  } else {
    for (int64_t c = 0; c < nc; ++c) {
      for (int64_t i = 0; i < n; ++i) out[c * out_stride + i] = static_cast<scalar_t>(in[i * kBlock<acc_t> + c]);
    }
  }
}

// The inverse of store_block_rows: nc rows of n values (channel c's at in + c * in_stride) to n pixels of a block
// of acc_t (pixel i at out + i * kBlock); channels past nc are left as they are.
template <typename scalar_t, typename acc_t>
void load_block_rows(const scalar_t* in, int64_t n, int64_t nc, int64_t in_stride, acc_t* out) {
  constexpr int64_t B = kBlock<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (nc == B) {
      const scalar_t* rows[B];
      for (int64_t c = 0; c < B; ++c) rows[c] = in + c * in_stride;
      interleave_row(rows, n, out);
      return;
    }
  }
  for (int64_t c = 0; c < nc; ++c) {
    for (int64_t i = 0; i < n; ++i) out[i * B + c] = static_cast<acc_t>(in[c * in_stride + i]);
  }
}

// Copies rows [y0, y1) of channels [c0, c0 + kBlock) of image n of `f` ([N, C, H, W], any strides) into buf as
// [H][W][kBlock] acc_t (the rows' part of it); channels past C are zero.
template <typename scalar_t, typename acc_t>
void gather_channel_block(const at::Tensor& f, int64_t n, int64_t c0, int64_t y0, int64_t y1, acc_t* buf) {
  constexpr int64_t B = kBlock<acc_t>;
  const int64_t C = f.size(1), W = f.size(3);
  const int64_t sC = f.stride(1), sH = f.stride(2), sW = f.stride(3);
  const scalar_t* base = f.data_ptr<scalar_t>() + n * f.stride(0) + c0 * sC;
  const int64_t nc = std::min(B, C - c0);
  if (nc < B) std::fill(buf + y0 * W * B, buf + y1 * W * B, acc_t(0));
  for (int64_t y = y0; y < y1; ++y) {
    acc_t* row = buf + y * W * B;
    if (sW == 1) {  // NCHW rows: a vector transpose for full blocks
      load_block_rows(base + y * sH, W, nc, sC, row);
    } else if (sC == 1) {  // channels-last: each pixel's channels are contiguous
      if (std::is_same_v<scalar_t, acc_t> && nc == B) {
        // One cache line a pixel, as a fixed-size copy (vector moves): the general loop below (a run-time channel
        // count) is compiled scalar. Either way the time goes to waiting for memory (perf), the pixels being C
        // values apart: on the channels_last benchmark the change is within this machine's noise, and an explicit
        // prefetch did not help.
        for (int64_t x = 0; x < W; ++x) std::memcpy(row + x * B, base + y * sH + x * sW, B * sizeof(acc_t));
      } else {
        for (int64_t x = 0; x < W; ++x) {
          const scalar_t* src = base + y * sH + x * sW;
          for (int64_t c = 0; c < nc; ++c) row[x * B + c] = static_cast<acc_t>(src[c]);
        }
      }
    } else {  // any strides: read each channel's row
      for (int64_t c = 0; c < nc; ++c) {
        const scalar_t* src = base + c * sC + y * sH;
        for (int64_t x = 0; x < W; ++x) row[x * B + c] = static_cast<acc_t>(src[x * sW]);
      }
    }
  }
}

// Writes buf ([H][W][kBlock]) back to channels [c0, c0 + kBlock) of image n of the NCHW-contiguous `out`, a
// chunk of pixels at a time: deinterleaved into `staged` (L1), then streamed out (stream_store; call
// stream_fence() before another thread reads `out`).
template <typename scalar_t, typename acc_t>
void scatter_channel_block(const acc_t* buf, int64_t n, int64_t c0, at::Tensor& out) {
  constexpr int64_t kChunk = 256;  // pixels: a staged chunk of 16 channels is 16 KB
  const int64_t C = out.size(1), HW = out.size(2) * out.size(3), nc = std::min(kBlock<acc_t>, C - c0);
  scalar_t* base = out.data_ptr<scalar_t>() + (n * C + c0) * HW;
  scalar_t staged[kBlock<acc_t> * kChunk];
  for (int64_t i = 0; i < HW; i += kChunk) {
    const int64_t len = std::min(kChunk, HW - i);
    store_block_rows<scalar_t, acc_t>(buf + i * kBlock<acc_t>, len, nc, staged, len);
    for (int64_t c = 0; c < nc; ++c) stream_store(staged + c * len, len * sizeof(scalar_t), base + c * HW + i);
  }
}

// A RoI's top edge as a sort key: NaN (a malformed RoI) sorts last, so the comparison stays a strict weak order.
template <typename T>
inline T top_edge_key(T y1) {
  return y1 == y1 ? y1 : std::numeric_limits<T>::infinity();
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
  // Orders each image's RoIs by `less` (a stable sort: ties keep RoI order, so the order is fixed).
  template <typename Less>
  void sort_each_image(Less less) {
    for (size_t n = 0; n + 1 < begin.size(); ++n) {
      std::stable_sort(ids.begin() + begin[n], ids.begin() + begin[n + 1], less);
    }
  }
};

}  // namespace fasterrcnn_ext

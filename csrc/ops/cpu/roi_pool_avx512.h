// roi_pool's running max written with AVX-512 intrinsics: one source, compiled twice.
//
// - roi_pool_kernel.cpp compiles it with the real intrinsics (<immintrin.h>, FRCNN_AVX512_FN = target("avx512f")):
//   the kernel that AVX-512 CPUs run.
// - roi_pool_avx512_twin.cpp compiles it with SIMDe's portable implementations of the same intrinsics: its CPU twin,
//   which runs on any x86-64 CPU, so the tests and the sanitizer build check this code's logic and memory accesses on
//   machines without AVX-512 (setup.py builds the twin where the SIMDe headers are installed).
//
// The includer declares the _mm512_* intrinsics and their types first, and defines FRCNN_AVX512_FN (the attributes
// of every function here). This header includes only <cfloat> and <cstdint>: the twin's translation unit must not see
// <immintrin.h>, whose declarations SIMDe's aliases would rename.
//
// max_pool_bin_avx512(buf, width, h0, h1, w0, w1, best, arg): the max over a bin's window of buf ([H][W][block],
// block = one 64-byte vector: 16 floats or 8 doubles) with its argmax (the index into the (H, W) plane; int32 for
// float, int64 for double); the first occurrence wins ties (strict >, NaN never wins); an empty bin gives 0 and -1.
// It reads buf[flat * block .. + block) for each pixel of the window and writes one vector to best and one to arg:
// the portable max_pool_bin's footprint exactly.
//
// A pixel's channel block is one vector. The compare writes a mask register, the value update is vmaxps (max(v,
// best) is "v > best ? v : best" bit for bit, NaN and signed zeros included: x86 max returns its second operand
// unless the first is greater) and the index update is a masked move: single-uop instructions where GCC's code for
// the portable vectors blends through vector masks (3 uops a blend on Intel cores), so this version is faster on
// Intel CPUs (docs/performance.md has the figures). The even and odd columns run as two independent chains, merged
// at the end with ties going to the smaller index: the sequential scan's answer.
#pragma once

#include <cfloat>
#include <cstdint>

namespace fasterrcnn_ext {
namespace roi_pool_avx512 {
// Internal linkage: each includer gets its own copy. The two compilations have the same C++ names and signatures
// (the vector types are not in them), so with external linkage the linker would keep one instantiation of
// max_pool_bin_avx512<float> for both translation units: AVX-512 CPUs would run the SIMDe twin (14 times slower than
// the portable kernel on a Xeon), or a CPU without AVX-512 the real kernel as the twin, and no result test would see
// it (both give the same bits; docs/performance.md). tests/ops/test_roi_pool_avx512_twin.py checks the library
// holds both copies, each with its own instructions.
namespace {

#define FRCNN_AVX512_HELPER FRCNN_AVX512_FN __attribute__((always_inline)) static inline

// The AVX-512 instructions the kernel needs, per element type: a 64-byte block is one vector V, with an index vector
// (int32 lanes for float, int64 for double) and a mask M (__mmask16 and __mmask8 are these unsigned integers; SIMDe
// has no __mmask8 alias). select(m, a, b) is m ? b : a, lane by lane. index_less(a, b) is written as b > a: SIMDe
// lacks the cmplt forms.
template <typename acc_t>
struct Block;
template <>
struct Block<float> {
  using V = __m512;
  using M = uint16_t;
  using index_t = int32_t;
  static constexpr int64_t kLanes = 16;
  FRCNN_AVX512_HELPER V load(const float* p) { return _mm512_loadu_ps(p); }
  FRCNN_AVX512_HELPER V fill(float v) { return _mm512_set1_ps(v); }
  FRCNN_AVX512_HELPER __m512i index(int64_t i) { return _mm512_set1_epi32(static_cast<int32_t>(i)); }
  FRCNN_AVX512_HELPER M greater(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  FRCNN_AVX512_HELPER M equal(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  FRCNN_AVX512_HELPER V max(V a, V b) { return _mm512_max_ps(a, b); }
  FRCNN_AVX512_HELPER M index_less(__m512i a, __m512i b) { return _mm512_cmpgt_epi32_mask(b, a); }
  FRCNN_AVX512_HELPER V select(M m, V a, V b) { return _mm512_mask_blend_ps(m, a, b); }
  FRCNN_AVX512_HELPER __m512i select(M m, __m512i a, __m512i b) { return _mm512_mask_blend_epi32(m, a, b); }
  FRCNN_AVX512_HELPER void store(float* p, V v) { _mm512_storeu_ps(p, v); }
};
template <>
struct Block<double> {
  using V = __m512d;
  using M = uint8_t;
  using index_t = int64_t;
  static constexpr int64_t kLanes = 8;
  FRCNN_AVX512_HELPER V load(const double* p) { return _mm512_loadu_pd(p); }
  FRCNN_AVX512_HELPER V fill(double v) { return _mm512_set1_pd(v); }
  FRCNN_AVX512_HELPER __m512i index(int64_t i) { return _mm512_set1_epi64(i); }
  FRCNN_AVX512_HELPER M greater(V a, V b) { return _mm512_cmp_pd_mask(a, b, _CMP_GT_OQ); }
  FRCNN_AVX512_HELPER M equal(V a, V b) { return _mm512_cmp_pd_mask(a, b, _CMP_EQ_OQ); }
  FRCNN_AVX512_HELPER V max(V a, V b) { return _mm512_max_pd(a, b); }
  FRCNN_AVX512_HELPER M index_less(__m512i a, __m512i b) { return _mm512_cmpgt_epi64_mask(b, a); }
  FRCNN_AVX512_HELPER V select(M m, V a, V b) { return _mm512_mask_blend_pd(m, a, b); }
  FRCNN_AVX512_HELPER __m512i select(M m, __m512i a, __m512i b) { return _mm512_mask_blend_epi64(m, a, b); }
  FRCNN_AVX512_HELPER void store(double* p, V v) { _mm512_storeu_pd(p, v); }
};

// One pixel into one chain: the max by vmaxps, the index where the pixel is strictly greater (a masked move).
template <typename acc_t>
FRCNN_AVX512_HELPER void update_chain(const acc_t* buf, int64_t flat, typename Block<acc_t>::V& best, __m512i& arg) {
  using X = Block<acc_t>;
  const typename X::V v = X::load(buf + flat * X::kLanes);
  const typename X::M greater = X::greater(v, best);
  best = X::max(v, best);
  arg = X::select(greater, arg, X::index(flat));
}

template <typename acc_t>
FRCNN_AVX512_FN void max_pool_bin_avx512(const acc_t* buf, int64_t width, int64_t h0, int64_t h1, int64_t w0,
                                         int64_t w1, acc_t* best, typename Block<acc_t>::index_t* arg) {
  using X = Block<acc_t>;
  const bool empty = h1 <= h0 || w1 <= w0;
  typename X::V even_best = X::fill(empty ? acc_t(0) : static_cast<acc_t>(-FLT_MAX)), odd_best = even_best;
  __m512i even_arg = X::index(-1), odd_arg = even_arg;
  for (int64_t h = h0; h < h1; ++h) {
    int64_t w = w0;
    for (; w + 1 < w1; w += 2) {
      update_chain<acc_t>(buf, h * width + w, even_best, even_arg);
      update_chain<acc_t>(buf, h * width + w + 1, odd_best, odd_arg);
    }
    if (w < w1) update_chain<acc_t>(buf, h * width + w, even_best, even_arg);
  }
  // The odd chain's max wins if greater, or equal at a smaller index (both chains are -1 only at -FLT_MAX).
  const typename X::M odd_wins = X::greater(odd_best, even_best) |
                                 (X::equal(odd_best, even_best) & X::index_less(odd_arg, even_arg));
  X::store(best, X::select(odd_wins, even_best, odd_best));
  _mm512_storeu_si512(arg, X::select(odd_wins, even_arg, odd_arg));
}

#undef FRCNN_AVX512_HELPER

}  // namespace
}  // namespace roi_pool_avx512
}  // namespace fasterrcnn_ext

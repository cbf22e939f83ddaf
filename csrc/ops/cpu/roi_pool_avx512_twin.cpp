// The CPU twin of roi_pool's AVX-512 kernel: roi_pool_avx512.h compiled with SIMDe's portable implementations of the
// _mm512_* intrinsics (the same names, through SIMDe's native aliases), so the kernel's source runs on any x86-64 CPU.
// The tests compare it with the portable kernel bit for bit, and scripts/sanitize.sh (TWIN=1) runs the op tests
// through it under AddressSanitizer: its logic and its memory accesses are checked on CPUs without AVX-512.
// What it cannot check is the compiled AVX-512 instructions themselves; AVX-512 CPUs run those tests on the real
// kernel.
//
// setup.py builds this file only where the SIMDe headers are installed (simde-py, libsimde-dev or SIMDE_INCLUDE),
// with the macro FRCNN_CPU_AVX512_TWIN=1. Nothing else is included before SIMDe: <immintrin.h> must not be seen here.
#include <cstdint>

// SIMDe's 64-byte vector types are passed by value between the always-inline helpers, which GCC warns changes the
// ABI without AVX512F; nothing here crosses a call boundary with them.
#pragma GCC diagnostic ignored "-Wpsabi"
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#define FRCNN_AVX512_FN
#include "ops/cpu/roi_pool_avx512.h"
#undef FRCNN_AVX512_FN

#if defined(SIMDE_X86_AVX512F_NATIVE)
#error "roi_pool_avx512_twin.cpp must be compiled without -mavx512f: it is the portable twin of the AVX-512 kernel"
#endif

namespace fasterrcnn_ext {

void max_pool_bin_avx512_twin(const float* buf, int64_t width, int64_t h0, int64_t h1, int64_t w0, int64_t w1,
                              float* best, int32_t* arg) {
  roi_pool_avx512::max_pool_bin_avx512<float>(buf, width, h0, h1, w0, w1, best, arg);
}

void max_pool_bin_avx512_twin(const double* buf, int64_t width, int64_t h0, int64_t h1, int64_t w0, int64_t w1,
                              double* best, int64_t* arg) {
  roi_pool_avx512::max_pool_bin_avx512<double>(buf, width, h0, h1, w0, w1, best, arg);
}

}  // namespace fasterrcnn_ext

// Run-time switches of the CPU kernels' hand-written ISA-specific loops. The portable loops are compiled per ISA by
// the compiler (FRCNN_CPU_MULTIVERSION) and picked by the loader; the hand-written ones are picked here, per call, so
// that fasterrcnn_ext.capabilities (the one place that decides the CPU fast paths) can turn them off.
#pragma once

namespace fasterrcnn_ext {

// True when the build has the AVX-512 loops, the CPU has AVX512F, and they have not been turned off.
bool cpu_avx512_kernels_enabled();

// True when the build has the AVX-512 kernels' CPU twins (SIMDe's portable intrinsics: roi_pool_avx512_twin.cpp) and
// they are switched on, by _cpu_set_avx512_twin or FRCNN_USE_AVX512_TWIN=1 in the environment at load. They then
// run in place of the AVX-512 and portable kernels, on any CPU: for tests and sanitizer runs, not for speed.
bool cpu_avx512_twin_enabled();

}  // namespace fasterrcnn_ext

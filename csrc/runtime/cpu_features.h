// Run-time switches of the CPU kernels' hand-written ISA-specific loops. The portable loops are compiled per ISA by
// the compiler (FRCNN_CPU_MULTIVERSION) and picked by the loader; the hand-written ones are picked here, per call, so
// that fasterrcnn_ext.capabilities (the one place that decides the CPU fast paths) can turn them off.
#pragma once

namespace fasterrcnn_ext {

// True when the build has the AVX-512 loops, the CPU has AVX512F, and they have not been turned off.
bool cpu_avx512_kernels_enabled();

}  // namespace fasterrcnn_ext

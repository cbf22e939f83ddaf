// Portability macros for code compiled both by the host C++ compiler (CPU kernels) and by nvcc.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FRCNN_HOST_DEVICE __host__ __device__
#define FRCNN_INLINE __host__ __device__ __forceinline__
#else
#define FRCNN_HOST_DEVICE
#define FRCNN_INLINE inline
#endif

// Function multiversioning for hot CPU loops: the loop is compiled for AVX-512, AVX2 and baseline x86-64,
// and the best clone is picked at load time. Wheels cannot assume -march=native.
// FRCNN_CPU_MAX_ISA_AVX2 (setup.py: FRCNN_CPU_MAX_ISA=avx2) leaves the AVX-512 clones out, so that an AVX-512
// machine runs, and benchmarks, the code an AVX2-only CPU runs.
// Hand-written AVX-512 versions (intrinsics) of a few hot loops, where GCC's code from the portable vector types is
// poor: FRCNN_CPU_AVX512_KERNELS says whether they are built (wherever the AVX-512 clones are), and the caller picks
// them per call through cpu_avx512_kernels_enabled() (runtime/cpu_features.h: the CPU has AVX512F and they are
// not turned off).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#if defined(FRCNN_CPU_MAX_ISA_AVX2)
#define FRCNN_CPU_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#define FRCNN_CPU_MULTIVERSION_ARCH __attribute__((target_clones("arch=x86-64-v3", "default")))
#define FRCNN_CPU_AVX512_KERNELS 0
#else
#define FRCNN_CPU_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#define FRCNN_CPU_MULTIVERSION_ARCH \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FRCNN_CPU_AVX512_KERNELS 1
#define FRCNN_CPU_TARGET_AVX512F __attribute__((target("avx512f")))
inline bool frcnn_cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
#endif
#else
#define FRCNN_CPU_MULTIVERSION
#define FRCNN_CPU_MULTIVERSION_ARCH
#define FRCNN_CPU_AVX512_KERNELS 0
#endif

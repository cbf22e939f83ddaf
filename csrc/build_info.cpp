// fasterrcnn_ext::_build_info: what this binary was compiled with, read by fasterrcnn_ext.build_info().
#include <ATen/Config.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

namespace fasterrcnn_ext {
namespace {

// The build facts are compile-time macros set by setup.py, so they describe this very binary.
std::string build_info() {
  std::string info;
  info += "version=" FRCNN_VERSION "\n";
  info += "torch_version=" TORCH_VERSION "\n";
#ifdef FRCNN_WITH_CUDA
  info += "cuda=1\ncuda_version=" FRCNN_CUDA_VERSION "\ncuda_arch_list=" FRCNN_CUDA_ARCH_LIST "\n";
#else
  info += "cuda=0\n";
#endif
#ifdef FRCNN_CPU_MAX_ISA_AVX2
  info += "cpu_max_isa=avx2\n";  // built without the AVX-512 clones (FRCNN_CPU_MAX_ISA=avx2)
#else
  info += "cpu_max_isa=avx512\n";
#endif
#if FRCNN_CPU_AVX512_TWIN
  info += "cpu_avx512_twin=1\n";  // roi_pool_avx512_twin.cpp is in (setup.py found SIMDe)
#else
  info += "cpu_avx512_twin=0\n";
#endif
#if AT_PARALLEL_OPENMP
  info += "parallel_backend=OpenMP\n";
#else
  info += "parallel_backend=native thread pool\n";
#endif
  return info;
}

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_FRAGMENT(fasterrcnn_ext, m) {
  m.def("_build_info() -> str", &fasterrcnn_ext::build_info);
}

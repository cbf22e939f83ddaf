// fasterrcnn_ext::_cpu_avx512_kernels / _cpu_set_avx512_kernels: what cpu_features.h's switch can be, and setting it
// (fasterrcnn_ext/capabilities.py is the caller); _cpu_avx512_twin / _cpu_set_avx512_twin: the switch of the AVX-512
// kernels' CPU twins (capabilities.avx512_twin(), for the tests; FRCNN_USE_AVX512_TWIN=1 for scripts/sanitize.sh).
#include "runtime/cpu_features.h"

#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <tuple>

#include "ops/common/host_device.h"

namespace fasterrcnn_ext {
namespace {

bool cpu_has_avx512f() {
#if FRCNN_CPU_AVX512_KERNELS
  return frcnn_cpu_has_avx512f();
#else
  return false;
#endif
}

std::atomic<bool>& avx512_switch() {
  static std::atomic<bool> enabled{cpu_has_avx512f()};
  return enabled;
}

// (built with the AVX-512 loops, CPU has AVX512F, enabled now)
std::tuple<bool, bool, bool> avx512_kernels() {
  return {FRCNN_CPU_AVX512_KERNELS != 0, cpu_has_avx512f(), cpu_avx512_kernels_enabled()};
}

// Turning them on where they cannot run leaves them off. Returns the setting in effect.
bool set_avx512_kernels(bool enabled) {
  avx512_switch().store(enabled && cpu_has_avx512f(), std::memory_order_relaxed);
  return cpu_avx512_kernels_enabled();
}

std::atomic<bool>& avx512_twin_switch() {
  static std::atomic<bool> enabled{[] {
    const char* env = std::getenv("FRCNN_USE_AVX512_TWIN");
    return FRCNN_CPU_AVX512_TWIN != 0 && env != nullptr && std::strcmp(env, "1") == 0;
  }()};
  return enabled;
}

// Turning the twins on in a build without them leaves them off. Returns the setting in effect.
bool set_avx512_twin(bool enabled) {
  avx512_twin_switch().store(enabled && FRCNN_CPU_AVX512_TWIN != 0, std::memory_order_relaxed);
  return cpu_avx512_twin_enabled();
}

}  // namespace

bool cpu_avx512_twin_enabled() { return avx512_twin_switch().load(std::memory_order_relaxed); }

bool cpu_avx512_kernels_enabled() { return avx512_switch().load(std::memory_order_relaxed); }

}  // namespace fasterrcnn_ext

TORCH_LIBRARY_FRAGMENT(fasterrcnn_ext, m) {
  m.def("_cpu_avx512_kernels() -> (bool, bool, bool)", &fasterrcnn_ext::avx512_kernels);
  m.def("_cpu_set_avx512_kernels(bool enabled) -> bool", &fasterrcnn_ext::set_avx512_kernels);
  m.def("_cpu_avx512_twin() -> bool", &fasterrcnn_ext::cpu_avx512_twin_enabled);
  m.def("_cpu_set_avx512_twin(bool enabled) -> bool", &fasterrcnn_ext::set_avx512_twin);
}

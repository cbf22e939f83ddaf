// Large outputs of the CPU kernels (the RoI ops write 50 MB for 1,000 RoIs of 256 channels at 7x7): glibc serves
// them from fresh mmap'd pages, so the first write to each 4 KB page faults, and the faults of the worker threads
// serialise on the process's memory map. Asking for transparent huge pages before the first write turns 512 faults
// into one (where the kernel's THP mode is "madvise", the common default; "always" needs no advice, "never"
// ignores it). Advice only: the values are unaffected.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fasterrcnn_ext {

// at::empty, advised to use huge pages when it spans several of them.
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.nbytes());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1), last = end & ~(kHugePage - 1);
  if (last >= first + 2 * kHugePage) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return t;
}

}  // namespace fasterrcnn_ext

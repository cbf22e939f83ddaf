// A reuse pool for the large CPU tensors of the detector's inference forward.
//
// Why: an R50-FPN forward on an 800-pixel image allocates about a gigabyte of activations (a single stride-4 map of
// 256 channels is 69 MB). glibc serves such blocks with fresh mmap'd pages and unmaps them on free, so every forward
// page-faults its activations in again: the kernel zeroes each 4 KB page on its first write, about a seventh of the
// whole forward on this project's 2-core machine. Blocks kept here are reused by the next forward with their pages
// already mapped. (glibc can be told the same for the whole process with MALLOC_MMAP_MAX_=0; this pool confines it
// to the forward passes that ask for it.)
//
// How: an allocator installed as torch's CPU allocator that pools only while the calling thread is inside a pooled
// scope (`_cpu_pool_set_enabled(True)`, the Python context manager fasterrcnn_ext.memory.cpu_pool()) and only
// blocks of at least kMinPooledBytes; every other allocation goes to the allocator it replaced, unchanged. A pooled
// block returns to the pool when its tensor is freed, on any thread, in or out of a scope. Free bytes are kept up to
// a byte limit (set_limit; beyond it, segments are released to the system as they become wholly free) and
// empty_cache() releases every wholly free segment.
//
// Memory is taken from the system in segments and handed out in blocks: a request takes the smallest free block that
// holds it (best fit), split when the rest is worth keeping, and a freed block merges with its free neighbours in
// the segment. A request no free block holds is a miss: the wholly free segments (each too small for it) go back to
// the system and one new segment as large as they were together, or as the request, replaces them. A forward's
// activation sizes change from stage to stage and from image size to image size, so whole blocks alone would leave
// the blocks of one size idle while another size allocates its own (docs/performance.md has the figures). Only
// whole free segments go back to the system.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "ops/common/checks.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <set>
#include <tuple>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fasterrcnn_ext {
namespace {

// Smaller blocks come from malloc's arenas, which already reuse them without page faults.
constexpr size_t kMinPooledBytes = size_t{1} << 20;
// Sizes are rounded up to this, so near-equal requests share blocks and every block stays 64-byte aligned.
constexpr size_t kGranularity = size_t{64} << 10;
// Segments spanning several huge pages are aligned to one and advised to use them (fewer faults and TLB misses).
constexpr size_t kHugePage = size_t{2} << 20;
// A block is split only if the rest is at least this large: a smaller rest would serve no pooled request on its
// own (the smallest is kMinPooledBytes), so it is handed out with the block.
constexpr size_t kMinSplitRest = kMinPooledBytes;
// Default cap on the bytes kept free in the pool: an R50-FPN forward at 800x1344 keeps about 0.6 GB.
constexpr int64_t kDefaultLimitBytes = int64_t{2} << 30;

thread_local bool tls_enabled = false;

class CpuMemoryPool final : public c10::Allocator {
 public:
  explicit CpuMemoryPool(c10::Allocator* fallback) : fallback_(fallback) {}

  c10::DataPtr allocate(size_t nbytes) override {
    if (!tls_enabled || nbytes < kMinPooledBytes) return fallback_->allocate(nbytes);
    void* ptr = take(nbytes);
    return {ptr, ptr, &release_pooled, c10::Device(c10::DeviceType::CPU)};
  }

  // raw_allocate/raw_deallocate must work whenever they worked with the replaced allocator: release_any hands
  // blocks that are not ours to the replaced allocator's raw deleter.
  c10::DeleterFnPtr raw_deleter() const override { return fallback_->raw_deleter() ? &release_any : nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static CpuMemoryPool& instance() {
    // Installed once, never destroyed: tensors holding pooled blocks may outlive static destruction.
    static CpuMemoryPool* pool = [] {
      auto* p = new CpuMemoryPool(c10::GetCPUAllocator());
      // Priority 0, the default's: a library installing its own allocator later still can (the pool then
      // stops pooling; stats() reports it inactive).
      c10::SetCPUAllocator(p, /*priority=*/0);
      return p;
    }();
    return *pool;
  }

  // Releases every whole free segment (a segment of which a block is in use stays, with its free blocks).
  void empty_cache() {
    std::vector<void*> to_free;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      release_free_segments_locked(to_free);
    }
    for (void* ptr : to_free) std::free(ptr);
  }

  void set_limit(int64_t limit) {
    FRCNN_CHECK(limit >= 0, "cpu memory pool: limit must be >= 0 bytes, got ", limit);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = static_cast<size_t>(limit);
    }
    if (cached_bytes() > static_cast<size_t>(limit)) empty_cache();
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(cached_bytes_), static_cast<int64_t>(in_use_bytes_), static_cast<int64_t>(hits_),
            static_cast<int64_t>(misses_), static_cast<int64_t>(limit_), active() ? 1 : 0,
            static_cast<int64_t>(peak_in_use_bytes_)};
  }

  // Whether torch's CPU allocator is still this pool (another library may have installed its own since).
  bool active() const { return c10::GetCPUAllocator() == this; }

 private:
  static void release_pooled(void* ptr) { instance().give_back(ptr); }

  static void release_any(void* ptr) {
    CpuMemoryPool& pool = instance();
    if (!pool.give_back(ptr)) pool.fallback_->raw_deleter()(ptr);
  }

  // A block of a segment; the blocks of a segment tile it in address order (prev/next), free or in use.
  struct Block {
    char* ptr;
    size_t size;
    bool free;
    Block* prev;
    Block* next;
    bool whole_segment() const { return prev == nullptr && next == nullptr; }
  };
  struct BySizeThenAddress {
    bool operator()(const Block* a, const Block* b) const {
      return std::tie(a->size, a->ptr) < std::tie(b->size, b->ptr);
    }
  };

  void* take(size_t nbytes) {
    const size_t rounded = (nbytes + kGranularity - 1) / kGranularity * kGranularity;
    std::vector<void*> reclaimed;
    size_t segment = rounded;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      Block probe{nullptr, rounded, true, nullptr, nullptr};
      auto it = free_.lower_bound(&probe);  // the smallest free block that holds the request
      if (it != free_.end()) {
        Block* b = *it;
        free_.erase(it);
        cached_bytes_ -= b->size;
        ++hits_;
        return hand_out_locked(b, rounded);
      }
      ++misses_;
      // Every free block is smaller than the request. Those that are whole segments go back to the system, and the
      // new segment is as large as they were together: the pool does not grow by a request it holds enough idle
      // memory for, and the larger segment, split, serves what they served.
      segment = std::max(rounded, release_free_segments_locked(reclaimed));
    }
    for (void* p : reclaimed) std::free(p);
    const size_t alignment = segment >= 2 * kHugePage ? kHugePage : 64;
    void* ptr = nullptr;
    if (posix_memalign(&ptr, alignment, segment) != 0) {
      // Free what the pool holds and try once more, at the request's size, before reporting out-of-memory.
      empty_cache();
      segment = rounded;
      if (posix_memalign(&ptr, alignment, segment) != 0) ptr = nullptr;
    }
    TORCH_CHECK_WITH(OutOfMemoryError, ptr != nullptr,
                     message("cpu memory pool: could not allocate ", nbytes, " bytes"));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (alignment == kHugePage) madvise(ptr, segment / kHugePage * kHugePage, MADV_HUGEPAGE);
#endif
    std::lock_guard<std::mutex> lock(mutex_);
    return hand_out_locked(new Block{static_cast<char*>(ptr), segment, false, nullptr, nullptr}, rounded);
  }

  // Marks block b (out of free_ and of cached_bytes_) in use for a request of `rounded` bytes, its rest split off
  // as a free block when it is worth keeping.
  void* hand_out_locked(Block* b, size_t rounded) {
    if (b->size - rounded >= kMinSplitRest) {
      auto* rest = new Block{b->ptr + rounded, b->size - rounded, true, b, b->next};
      if (b->next != nullptr) b->next->prev = rest;
      b->next = rest;
      b->size = rounded;
      free_.insert(rest);
      cached_bytes_ += rest->size;
    }
    b->free = false;
    used_.emplace(b->ptr, b);
    in_use_bytes_ += b->size;
    peak_in_use_bytes_ = std::max(peak_in_use_bytes_, in_use_bytes_);
    return b->ptr;
  }

  // Returns false if ptr is not a block of this pool.
  bool give_back(void* ptr) {
    void* release = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = used_.find(ptr);
      if (it == used_.end()) return false;
      Block* b = it->second;
      used_.erase(it);
      in_use_bytes_ -= b->size;
      cached_bytes_ += b->size;
      b->free = true;
      if (b->next != nullptr && b->next->free) b = merge_locked(b, b->next);
      if (b->prev != nullptr && b->prev->free) b = merge_locked(b->prev, b);
      if (b->whole_segment() && cached_bytes_ > limit_) {
        release = release_segment_locked(b);
      } else {
        free_.insert(b);
      }
    }
    if (release != nullptr) std::free(release);
    return true;
  }

  // Merges free neighbours `left` and `right` (left->next == right) into left; both leave free_ first.
  Block* merge_locked(Block* left, Block* right) {
    free_.erase(left);  // no-op for the block being given back, which is not in free_ yet
    free_.erase(right);
    left->size += right->size;
    left->next = right->next;
    if (right->next != nullptr) right->next->prev = left;
    delete right;
    return left;
  }

  // Takes every wholly free segment out of the pool, appending the pointers to hand to std::free to `to_free`;
  // returns their bytes.
  size_t release_free_segments_locked(std::vector<void*>& to_free) {
    size_t released = 0;
    for (auto it = free_.begin(); it != free_.end();) {
      Block* b = *it;
      if (b->whole_segment()) {
        it = free_.erase(it);
        released += b->size;
        to_free.push_back(release_segment_locked(b));
      } else {
        ++it;
      }
    }
    return released;
  }

  // Forgets a whole free segment's block (already out of free_) and returns the pointer to hand to std::free.
  void* release_segment_locked(Block* b) {
    void* ptr = b->ptr;
    cached_bytes_ -= b->size;
    delete b;
    return ptr;
  }

  c10::Allocator* fallback_;
  std::mutex mutex_;
  std::unordered_map<void*, Block*> used_;      // blocks in use, by address
  std::set<Block*, BySizeThenAddress> free_;   // free blocks, by size then address
  size_t cached_bytes_ = 0, in_use_bytes_ = 0, peak_in_use_bytes_ = 0, hits_ = 0, misses_ = 0;
  size_t limit_ = static_cast<size_t>(kDefaultLimitBytes);
};

// Pooling on or off for the calling thread; returns the previous setting.
bool set_enabled(bool enabled) {
  CpuMemoryPool::instance();  // installs the allocator on first use
  const bool previous = tls_enabled;
  tls_enabled = enabled;
  return previous;
}

void empty_cache() { CpuMemoryPool::instance().empty_cache(); }

void set_limit(int64_t limit_bytes) { CpuMemoryPool::instance().set_limit(limit_bytes); }

// [cached bytes, in-use bytes, hits, misses, limit bytes, active, peak in-use bytes]
std::vector<int64_t> stats() { return CpuMemoryPool::instance().stats(); }

}  // namespace
}  // namespace fasterrcnn_ext

TORCH_LIBRARY_FRAGMENT(fasterrcnn_ext, m) {
  m.def("_cpu_pool_set_enabled(bool enabled) -> bool", &fasterrcnn_ext::set_enabled);
  m.def("_cpu_pool_empty_cache() -> ()", &fasterrcnn_ext::empty_cache);
  m.def("_cpu_pool_set_limit(int limit_bytes) -> ()", &fasterrcnn_ext::set_limit);
  m.def("_cpu_pool_stats() -> int[]", &fasterrcnn_ext::stats);
}

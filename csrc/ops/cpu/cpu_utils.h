#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace cnnviz {
namespace cpu {

// Large fresh outputs (e.g. a whole occlusion batch, hundreds of MB) spend most of their
// time in first-touch page faults; asking for transparent huge pages on the aligned
// interior of the buffer (before it is written) cuts that cost several-fold. A no-op
// where THP is unavailable or disabled.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;  // 2 MiB
  constexpr size_t kMinBytes = size_t(32) << 20;
  const size_t bytes = t.nbytes();
  if (bytes < kMinBytes) {
    return;
  }
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + bytes) & ~(kHuge - 1);
  if (hi > lo) {
    (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#else
  (void)t;
#endif
}

} // namespace cpu
} // namespace cnnviz

#pragma once

#include <algorithm>
#include <cstdint>

namespace cnnviz {
namespace cuda {

constexpr int kThreads = 256;

// Grid for a grid-stride loop over n elements.
inline unsigned int blocks_for(int64_t n) {
  constexpr int64_t kMaxBlocks = int64_t(1) << 20;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

#define CNNVIZ_GRID_STRIDE_LOOP(i, n)                                                  \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

} // namespace cuda
} // namespace cnnviz

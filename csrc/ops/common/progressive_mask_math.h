#pragma once

#include <cstdint>

#include "macros.h"

namespace cnnviz {
namespace progressive {

// Cell of pixel (h, x) in the ranking grid of ph x pw patches with `cols` columns
// (patch 1 x 1: the pixel itself).
CNNVIZ_HOST_DEVICE inline int64_t cell(int64_t h, int64_t x, int64_t ph, int64_t pw, int64_t cols) {
  return (h / ph) * cols + x / pw;
}

// Whether a cell of rank `rank` (0 = most important) shows the baseline at a step that
// moves the `count` top-ranked cells: deletion replaces them by the baseline; insertion
// starts from the baseline and reveals them (everything else stays baseline).
template <typename index_t>
CNNVIZ_HOST_DEVICE inline bool shows_baseline(index_t rank, index_t count, bool insertion) {
  return (rank < count) != insertion;
}

template <typename T>
CNNVIZ_HOST_DEVICE inline T select(bool baseline_here, T image, T baseline) {
  return baseline_here ? baseline : image;
}

} // namespace progressive
} // namespace cnnviz

#pragma once

#include <cstdint>

#include "macros.h"

namespace cnnviz {
namespace segment {

// Whether a pixel of segment `id` shows the image in an output row whose keep flags are
// keep_row[0 .. K-1]. Ids outside [0, K) (the Python wrapper refuses them) show the
// baseline, so a bad label never reads past the row.
CNNVIZ_HOST_DEVICE inline bool keeps(const bool* keep_row, int64_t K, int64_t id) {
  return id >= 0 && id < K && keep_row[id];
}

template <typename T>
CNNVIZ_HOST_DEVICE inline T select(bool kept, T image, T baseline) {
  return kept ? image : baseline;
}

// Offset of element (b, c, y, x) of a [B, C, H, W] tensor stored contiguous (NCHW) or
// channels-last (NHWC).
CNNVIZ_HOST_DEVICE inline int64_t offset(
    int64_t b, int64_t c, int64_t y, int64_t x, int64_t C, int64_t H, int64_t W, bool channels_last) {
  return channels_last ? ((b * H + y) * W + x) * C + c : ((b * C + c) * H + y) * W + x;
}

} // namespace segment
} // namespace cnnviz

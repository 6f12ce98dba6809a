#pragma once

// Host-side argument checks shared by the CPU and CUDA entry points of the RISE ops.
#include <cmath>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "image_checks.h"
#include "rise_math.h"

namespace cnnviz {
namespace rise {

// Masks first .. first+count-1 must have indices below 2^31 (the hash takes 32 bits).
constexpr int64_t kMaxMasks = int64_t(1) << 31;

inline Geometry check_geometry(
    int64_t H, int64_t W, at::IntArrayRef grid, double p, int64_t first, int64_t count) {
  TORCH_CHECK(grid.size() == 2, "grid must have 2 values (grid_h, grid_w), got ", grid.size());
  TORCH_CHECK(grid[0] > 0 && grid[1] > 0, "grid must be positive, got ", grid);
  TORCH_CHECK(H > 0 && W > 0, "image size (H, W) must be positive, got (", H, ", ", W, ")");
  TORCH_CHECK(p > 0.0 && p < 1.0, "p must lie in (0, 1), got ", p);
  TORCH_CHECK(first >= 0, "first must be a non-negative int, got ", first);
  TORCH_CHECK(count >= 0, "count must be a non-negative int, got ", count);
  TORCH_CHECK(
      first + count <= kMaxMasks, "first + count must be <= 2^31 (mask indices), got ", first + count);
  Geometry g;
  g.gh = grid[0];
  g.gw = grid[1];
  TORCH_CHECK(g.gh <= H && g.gw <= W, "grid ", grid, " must not exceed the image (", H, ", ", W, ")");
  g.cell_h = (H + g.gh - 1) / g.gh;
  g.cell_w = (W + g.gw - 1) / g.gw;
  g.up_h = (g.gh + 1) * g.cell_h;
  g.up_w = (g.gw + 1) * g.cell_w;
  g.threshold = static_cast<int64_t>(std::ceil(p * 16777216.0));
  return g;
}

} // namespace rise
} // namespace cnnviz

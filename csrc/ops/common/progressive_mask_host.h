#pragma once

// Host-side argument checks shared by the CPU and CUDA entry points of progressive_mask.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "image_checks.h"

namespace cnnviz {
namespace progressive {

// Ranking grid: rows x cols cells of ph x pw pixels (the last row / column clipped).
struct Grid {
  int64_t ph, pw, rows, cols;
};

inline Grid check_progressive_args(
    const at::Tensor& images, const at::Tensor& ranks, const at::Tensor& baseline,
    at::IntArrayRef counts, at::IntArrayRef patch) {
  check_images(images);
  const int64_t N = images.size(0), H = images.size(2), W = images.size(3);
  TORCH_CHECK(H > 0 && W > 0, "images must have a non-empty image plane, got H=", H, ", W=", W);
  TORCH_CHECK(patch.size() == 2, "patch must have 2 values (ph, pw), got ", patch.size());
  TORCH_CHECK(patch[0] > 0 && patch[1] > 0, "patch must be positive, got ", patch);
  Grid g;
  g.ph = patch[0];
  g.pw = patch[1];
  g.rows = (H + g.ph - 1) / g.ph;
  g.cols = (W + g.pw - 1) / g.pw;
  TORCH_CHECK(
      ranks.dim() == 2 && ranks.size(0) == N && ranks.size(1) == g.rows * g.cols,
      "ranks must have shape [N, rows*cols] = [", N, ", ", g.rows * g.cols, "] for H=", H,
      ", W=", W, ", patch=", patch, "; got ", ranks.sizes());
  TORCH_CHECK(
      ranks.scalar_type() == at::kLong, "ranks must be an int64 tensor, got ", ranks.scalar_type());
  TORCH_CHECK(
      ranks.device() == images.device(), "ranks must be on the images' device ", images.device(),
      ", got ", ranks.device());
  for (const int64_t c : counts) {
    TORCH_CHECK(
        c >= 0 && c <= g.rows * g.cols, "counts must lie in [0, ", g.rows * g.cols, "], got ", c);
  }
  check_baseline(images, baseline);
  return g;
}

} // namespace progressive
} // namespace cnnviz

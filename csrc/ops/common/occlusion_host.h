#pragma once

// Host-side argument checks shared by the CPU and CUDA entry points.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "image_checks.h"

namespace cnnviz {
namespace occlusion {

struct Geometry {
  int64_t kh, kw, sh, sw, rows, cols;
};

inline Geometry check_geometry(
    at::IntArrayRef window, at::IntArrayRef stride, int64_t H, int64_t W) {
  TORCH_CHECK(window.size() == 2, "window must have 2 values (kh, kw), got ", window.size());
  TORCH_CHECK(stride.size() == 2, "stride must have 2 values (sh, sw), got ", stride.size());
  TORCH_CHECK(window[0] > 0 && window[1] > 0, "window must be positive, got ", window);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, "stride must be positive, got ", stride);
  TORCH_CHECK(H > 0 && W > 0, "image size (H, W) must be positive, got (", H, ", ", W, ")");
  TORCH_CHECK(
      window[0] <= H && window[1] <= W, "window must fit in the image: window ", window,
      " > image (", H, ", ", W, ")");
  Geometry g;
  g.kh = window[0];
  g.kw = window[1];
  g.sh = stride[0];
  g.sw = stride[1];
  g.rows = (H - g.kh + g.sh - 1) / g.sh + 1;
  g.cols = (W - g.kw + g.sw - 1) / g.sw + 1;
  return g;
}

inline void check_occlude_args(
    const at::Tensor& images, const at::Tensor& baseline, int64_t first, int64_t count,
    const Geometry& g) {
  TORCH_CHECK(first >= 0, "first must be >= 0, got ", first);
  TORCH_CHECK(count >= 0, "count must be >= 0, got ", count);
  TORCH_CHECK(
      first + count <= g.rows * g.cols,
      "first + count must be <= the number of window positions ", g.rows, "x", g.cols, "=",
      g.rows * g.cols, ", got first=", first, ", count=", count);
  check_baseline(images, baseline);
}

inline void check_deltas(const at::Tensor& deltas, int64_t H, int64_t W, const Geometry& g) {
  TORCH_CHECK(
      deltas.dim() == 2, "deltas must be a 2-D tensor [N, P], got ", deltas.dim(), "-D");
  TORCH_CHECK(
      at::isFloatingType(deltas.scalar_type()), "deltas must be a floating-point tensor, got ",
      deltas.scalar_type());
  TORCH_CHECK(
      deltas.size(1) == g.rows * g.cols, "deltas must have P = rows*cols = ", g.rows, "*",
      g.cols, " = ", g.rows * g.cols, " columns for H=", H, ", W=", W, "; got P=",
      deltas.size(1));
}

} // namespace occlusion
} // namespace cnnviz

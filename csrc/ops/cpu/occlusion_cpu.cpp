#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/occlusion_host.h"
#include "../common/occlusion_math.h"
#include "cpu_utils.h"

namespace cnnviz {
namespace ops {

namespace {

using occlusion::Geometry;
using occlusion::Window;

// Rows of W elements, in chunks of about kChunkElements: rows outside the window are a
// plain copy, rows crossing it go through the shared occlude_row (as on the GPU).
constexpr int64_t kChunkElements = 1 << 15;

template <typename scalar_t>
void occlude_kernel(
    const scalar_t* images, const scalar_t* baseline, bool baseline_full, scalar_t* out,
    int64_t N, int64_t C, int64_t H, int64_t W, int64_t first, int64_t count,
    const Geometry& g) {
  const int64_t rows = N * count * C * H;
  const scalar_t b0 = baseline[0];
  const int64_t grain = std::max<int64_t>(1, kChunkElements / W);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const occlusion::OutputRow r = occlusion::output_row(row, C, H, count);
      const Window win =
          occlusion::window_bounds(first + r.k, g.cols, g.kh, g.kw, g.sh, g.sw, H, W);
      const int64_t src_off = (r.n * C * H + r.ch) * W;
      const scalar_t* src = images + src_off;
      scalar_t* dst = out + row * W;
      if (!occlusion::row_inside(win, r.h)) {
        std::copy(src, src + W, dst);
      } else {
        occlusion::occlude_row<1>(
            win, true, src, baseline_full ? baseline + src_off : nullptr, b0, dst, 0, W, 1);
      }
    }
  });
}

// One task per image: scatter the window deltas into a (H+1) x (W+1) difference array
// (4 corner updates per window), 2-D prefix sums, multiply by 1 / cover count.
template <typename scalar_t>
void accumulate_kernel(
    const scalar_t* deltas, scalar_t* out, int64_t N, int64_t H, int64_t W,
    const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t P = g.rows * g.cols;
  const int64_t W1 = W + 1;
  std::vector<acc_t> inv_row(H), inv_col(W);
  for (int64_t h = 0; h < H; ++h) {
    inv_row[h] = occlusion::inverse_count<acc_t>(occlusion::cover_count_1d(h, g.kh, g.sh, g.rows));
  }
  for (int64_t x = 0; x < W; ++x) {
    inv_col[x] = occlusion::inverse_count<acc_t>(occlusion::cover_count_1d(x, g.kw, g.sw, g.cols));
  }
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> diff((H + 1) * W1);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(diff.begin(), diff.end(), acc_t(0));
      const scalar_t* d = deltas + n * P;
      for (int64_t p = 0; p < P; ++p) {
        const Window win = occlusion::window_bounds(p, g.cols, g.kh, g.kw, g.sh, g.sw, H, W);
        const acc_t v = static_cast<acc_t>(d[p]);
        for (int k = 0; k < 4; ++k) {
          int64_t idx;
          const int sign = occlusion::corner(win, W1, k, &idx);
          diff[idx] += sign > 0 ? v : -v;
        }
      }
      // prefix sums along each row, then down the columns (row h += row h-1)
      for (int64_t h = 0; h < H; ++h) {
        acc_t* row = diff.data() + h * W1;
        acc_t run = 0;
        for (int64_t x = 0; x < W; ++x) {
          run += row[x];
          row[x] = run;
        }
      }
      scalar_t* o = out + n * H * W;
      for (int64_t h = 0; h < H; ++h) {
        acc_t* row = diff.data() + h * W1;
        if (h > 0) {
          const acc_t* prev = row - W1;
          for (int64_t x = 0; x < W; ++x) {
            row[x] += prev[x];
          }
        }
        const acc_t ir = inv_row[h];
        scalar_t* orow = o + h * W;
        for (int64_t x = 0; x < W; ++x) {
          orow[x] = static_cast<scalar_t>(row[x] * (ir * inv_col[x]));
        }
      }
    }
  });
}

at::Tensor occlude_cpu(
    const at::Tensor& images, at::IntArrayRef window, at::IntArrayRef stride,
    const at::Tensor& baseline, int64_t first, int64_t count) {
  cnnviz::check_images(images);
  TORCH_CHECK(images.device().is_cpu(), "images must be a CPU tensor, got ", images.device());
  const int64_t N = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const Geometry g = occlusion::check_geometry(window, stride, H, W);
  occlusion::check_occlude_args(images, baseline, first, count, g);
  auto out = at::empty({N, count, C, H, W}, images.options());
  if (out.numel() == 0) {
    return out;
  }
  cpu::advise_huge_pages(out);
  const auto img = images.contiguous();
  const auto base = baseline.contiguous();
  const bool baseline_full = base.numel() != 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, images.scalar_type(), "occlude_cpu", [&] {
        occlude_kernel<scalar_t>(
            img.const_data_ptr<scalar_t>(), base.const_data_ptr<scalar_t>(), baseline_full,
            out.mutable_data_ptr<scalar_t>(), N, C, H, W, first, count, g);
      });
  return out;
}

at::Tensor occlusion_accumulate_cpu(
    const at::Tensor& deltas, int64_t H, int64_t W, at::IntArrayRef window,
    at::IntArrayRef stride) {
  TORCH_CHECK(deltas.device().is_cpu(), "deltas must be a CPU tensor, got ", deltas.device());
  const Geometry g = occlusion::check_geometry(window, stride, H, W);
  occlusion::check_deltas(deltas, H, W, g);
  const int64_t N = deltas.size(0);
  auto out = at::empty({N, H, W}, deltas.options());
  if (N == 0) {
    return out;
  }
  const auto d = deltas.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, deltas.scalar_type(),
      "occlusion_accumulate_cpu", [&] {
        accumulate_kernel<scalar_t>(
            d.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), N, H, W, g);
      });
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(cnnviz, CPU, m) {
  m.impl("occlude", &occlude_cpu);
  m.impl("occlusion_accumulate", &occlusion_accumulate_cpu);
}

} // namespace ops
} // namespace cnnviz

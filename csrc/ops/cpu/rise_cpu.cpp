#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/rise_host.h"
#include "../common/rise_math.h"
#include "cpu_utils.h"

namespace cnnviz {
namespace ops {

namespace {

using rise::Geometry;
using rise::Taps;

// Mask `m` as H*W values of type T (cast from the exact double ratio through float for
// float / half / bfloat16, as the reference does). The grid's cells and the taps of each row
// and column are computed once per mask, then each pixel sums its on corners.
template <typename T>
void fill_mask(int64_t seed, int64_t m, int64_t H, int64_t W, const Geometry& g, T* dst,
               std::vector<uint8_t>& cells, std::vector<Taps>& cols) {
  const uint32_t key = rise::mask_key(seed, m);
  cells.resize(g.gh * g.gw);
  for (int64_t j = 0; j < g.gh * g.gw; ++j) {
    cells[j] = rise::cell_on(key, j, g.threshold);
  }
  const int64_t dy = rise::shift_y(key, g), dx = rise::shift_x(key, g);
  cols.resize(W);
  for (int64_t x = 0; x < W; ++x) {
    cols[x] = rise::taps(x + dx, g.gw, g.up_w);
  }
  const uint8_t* on_cells = cells.data();
  const int64_t gw = g.gw;
  auto on = [on_cells, gw](int64_t r, int64_t c) { return on_cells[r * gw + c] != 0; };
  for (int64_t h = 0; h < H; ++h) {
    const Taps ty = rise::taps(h + dy, g.gh, g.up_h);
    for (int64_t x = 0; x < W; ++x) {
      const double v = rise::value(rise::numerator(ty, cols[x], on), g);
      dst[h * W + x] = static_cast<T>(static_cast<at::opmath_type<T>>(v));
    }
  }
}

// out[n, k] = images[n] * mask(first + k): one task per mask, whose plane is computed once
// and applied to every image and channel.
template <typename scalar_t>
void rise_mask_kernel(const scalar_t* images, scalar_t* out, int64_t N, int64_t C, int64_t H,
                      int64_t W, int64_t seed, int64_t first, int64_t count, const Geometry& g) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t plane = H * W;
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> mask(plane);
    std::vector<uint8_t> cells;
    std::vector<Taps> cols;
    for (int64_t k = begin; k < end; ++k) {
      fill_mask<scalar_t>(seed, first + k, H, W, g, mask.data(), cells, cols);
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* src = images + (n * C + c) * plane;
          scalar_t* dst = out + ((n * count + k) * C + c) * plane;
          for (int64_t i = 0; i < plane; ++i) {
            dst[i] = static_cast<scalar_t>(static_cast<opmath_t>(src[i]) * static_cast<opmath_t>(mask[i]));
          }
        }
      }
    }
  });
}

at::Tensor rise_mask_cpu(const at::Tensor& images, int64_t seed, at::IntArrayRef grid, double p,
                         int64_t first, int64_t count) {
  TORCH_CHECK(images.device().is_cpu(), "images must be a CPU tensor, got ", images.device());
  check_images(images);
  const int64_t N = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const Geometry g = rise::check_geometry(H, W, grid, p, first, count);
  auto out = at::empty({N, count, C, H, W}, images.options());
  if (out.numel() == 0) {
    return out;
  }
  cpu::advise_huge_pages(out);
  const auto img = images.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, images.scalar_type(), "rise_mask_cpu", [&] {
        rise_mask_kernel<scalar_t>(img.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                   N, C, H, W, seed, first, count, g);
      });
  return out;
}

// Masks per chunk of rise_accumulate: scores [N, chunk] @ masks [chunk, H*W] per chunk.
constexpr int64_t kAccumulateChunk = 64;

at::Tensor rise_accumulate_cpu(const at::Tensor& scores, int64_t H, int64_t W, int64_t seed,
                               at::IntArrayRef grid, double p, int64_t first) {
  TORCH_CHECK(scores.device().is_cpu(), "scores must be a CPU tensor, got ", scores.device());
  TORCH_CHECK(scores.dim() == 2, "scores must be a 2-D tensor [N, count], got ", scores.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()), "scores must be a floating-point tensor, got ",
              scores.scalar_type());
  const int64_t N = scores.size(0), count = scores.size(1);
  const Geometry g = rise::check_geometry(H, W, grid, p, first, count);
  const auto acc_type = at::toOpMathType(scores.scalar_type());
  auto acc = at::zeros({N, H * W}, scores.options().dtype(acc_type));
  if (N == 0 || count == 0) {
    return acc.view({N, H, W}).to(scores.scalar_type());
  }
  const auto s = scores.to(acc_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc_type, "rise_accumulate_cpu", [&] {
    for (int64_t k0 = 0; k0 < count; k0 += kAccumulateChunk) {
      const int64_t k1 = std::min(count, k0 + kAccumulateChunk);
      auto masks = at::empty({k1 - k0, H * W}, acc.options());
      scalar_t* data = masks.mutable_data_ptr<scalar_t>();
      at::parallel_for(k0, k1, 1, [&](int64_t begin, int64_t end) {
        std::vector<uint8_t> cells;
        std::vector<Taps> cols;
        for (int64_t k = begin; k < end; ++k) {
          fill_mask<scalar_t>(seed, first + k, H, W, g, data + (k - k0) * H * W, cells, cols);
        }
      });
      acc.addmm_(s.narrow(1, k0, k1 - k0), masks);
    }
  });
  return acc.view({N, H, W}).to(scores.scalar_type());
}

} // namespace

TORCH_LIBRARY_IMPL(cnnviz, CPU, m) {
  m.impl("rise_mask", &rise_mask_cpu);
  m.impl("rise_accumulate", &rise_accumulate_cpu);
}

} // namespace ops
} // namespace cnnviz

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/progressive_mask_host.h"
#include "../common/progressive_mask_math.h"
#include "cpu_utils.h"

namespace cnnviz {
namespace ops {

namespace {

using progressive::Grid;

// One task per (image n, step k): the step's H x W mask is built once from the ranks (one
// rank lookup per pixel), then every channel plane is a branch-free select.
template <typename scalar_t>
void progressive_mask_kernel(
    const scalar_t* images, const int64_t* ranks, const scalar_t* baseline, bool baseline_full,
    const std::vector<int64_t>& counts, bool insertion, scalar_t* out, int64_t N, int64_t C,
    int64_t H, int64_t W, const Grid& g) {
  const int64_t K = static_cast<int64_t>(counts.size());
  const int64_t plane = H * W;
  const int64_t image_numel = C * plane;
  const int64_t R = g.rows * g.cols;
  at::parallel_for(0, N * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> mask(plane);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / K;
      const int64_t count = counts[task % K];
      const int64_t* rank = ranks + n * R;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t x = 0; x < W; ++x) {
          mask[h * W + x] = progressive::shows_baseline(
              rank[progressive::cell(h, x, g.ph, g.pw, g.cols)], count, insertion);
        }
      }
      const scalar_t* src = images + n * image_numel;
      const scalar_t* base = baseline_full ? baseline + n * image_numel : baseline;
      scalar_t* dst = out + task * image_numel;
      const scalar_t b0 = baseline[0];
      for (int64_t c = 0; c < C; ++c) {
        const int64_t off = c * plane;
        if (baseline_full) {
          for (int64_t i = 0; i < plane; ++i) {
            dst[off + i] = progressive::select(mask[i] != 0, src[off + i], base[off + i]);
          }
        } else {
          for (int64_t i = 0; i < plane; ++i) {
            dst[off + i] = progressive::select(mask[i] != 0, src[off + i], b0);
          }
        }
      }
    }
  });
}

at::Tensor progressive_mask_cpu(
    const at::Tensor& images, const at::Tensor& ranks, const at::Tensor& baseline,
    at::IntArrayRef counts, at::IntArrayRef patch, bool insertion) {
  TORCH_CHECK(images.device().is_cpu(), "images must be a CPU tensor, got ", images.device());
  const Grid g = progressive::check_progressive_args(images, ranks, baseline, counts, patch);
  const int64_t N = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t K = static_cast<int64_t>(counts.size());
  auto out = at::empty({N, K, C, H, W}, images.options());
  if (out.numel() == 0) {
    return out;
  }
  cpu::advise_huge_pages(out);
  const auto img = images.contiguous();
  const auto rk = ranks.contiguous();
  const auto base = baseline.contiguous();
  const bool baseline_full = base.numel() != 1;
  const std::vector<int64_t> steps(counts.begin(), counts.end());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, images.scalar_type(),
      "progressive_mask_cpu", [&] {
        progressive_mask_kernel<scalar_t>(
            img.const_data_ptr<scalar_t>(), rk.const_data_ptr<int64_t>(),
            base.const_data_ptr<scalar_t>(), baseline_full, steps, insertion,
            out.mutable_data_ptr<scalar_t>(), N, C, H, W, g);
      });
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(cnnviz, CPU, m) {
  m.impl("progressive_mask", &progressive_mask_cpu);
}

} // namespace ops
} // namespace cnnviz

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

// One channel plane of one step. `insertion` and a full baseline are template
// parameters and ranks are int32, so the loop is a plain vectorisable compare-and-blend.
template <typename scalar_t, bool kInsertion, bool kFullBaseline>
void fill_plane(
    const int32_t* rank, int32_t count, const scalar_t* src, const scalar_t* base, scalar_t b0,
    scalar_t* dst, int64_t plane) {
  for (int64_t i = 0; i < plane; ++i) {
    dst[i] = progressive::select(
        progressive::shows_baseline(rank[i], count, kInsertion), src[i],
        kFullBaseline ? base[i] : b0);
  }
}

// Two passes: each pixel's rank is looked up once per image (the patch-cell divisions
// run N*H*W times, not N*K*H*W), then one task per (image n, step k) writes every
// channel plane.
template <typename scalar_t>
void progressive_mask_kernel(
    const scalar_t* images, const int64_t* ranks, const scalar_t* baseline, bool baseline_full,
    const std::vector<int64_t>& counts, bool insertion, scalar_t* out, int64_t N, int64_t C,
    int64_t H, int64_t W, const Grid& g) {
  const int64_t K = static_cast<int64_t>(counts.size());
  const int64_t plane = H * W;
  const int64_t image_numel = C * plane;
  const int64_t R = g.rows * g.cols;
  // ranks outside [0, R) (not a permutation) only compare differently; clamping keeps
  // the int32 narrowing exact for every count in [0, R]
  std::vector<int32_t> pixel_rank(N * plane);
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / H, h = row % H;
      const int64_t* rank = ranks + n * R;
      int32_t* dst = pixel_rank.data() + row * W;
      for (int64_t x = 0; x < W; ++x) {
        const int64_t r = rank[progressive::cell(h, x, g.ph, g.pw, g.cols)];
        dst[x] = static_cast<int32_t>(r < 0 ? -1 : (r > R ? R : r));
      }
    }
  });
  using Fill = void (*)(const int32_t*, int32_t, const scalar_t*, const scalar_t*, scalar_t, scalar_t*, int64_t);
  const Fill fill = insertion
      ? (baseline_full ? &fill_plane<scalar_t, true, true> : &fill_plane<scalar_t, true, false>)
      : (baseline_full ? &fill_plane<scalar_t, false, true> : &fill_plane<scalar_t, false, false>);
  at::parallel_for(0, N * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / K;
      const int32_t count = static_cast<int32_t>(counts[task % K]);
      const int32_t* rank = pixel_rank.data() + n * plane;
      const scalar_t* src = images + n * image_numel;
      const scalar_t* base = baseline_full ? baseline + n * image_numel : baseline;
      scalar_t* dst = out + task * image_numel;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t off = c * plane;
        fill(rank, count, src + off, baseline_full ? base + off : base, baseline[0], dst + off, plane);
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
  TORCH_CHECK(
      g.rows * g.cols < (int64_t(1) << 31), "images have too many cells for int32 ranks: ",
      g.rows * g.cols);
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

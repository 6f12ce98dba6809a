#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/rise_host.h"
#include "../common/rise_math.h"
#include "cuda_utils.cuh"

namespace cnnviz {
namespace ops {

namespace {

using rise::Geometry;
using rise::Taps;

// Value of mask m at pixel (h, x) as T (through float for float / half / bfloat16, as on the
// CPU). Each thread hashes the (at most four) cells it reads: a few dozen integer
// operations, cheaper on a GPU than staging the grid.
template <typename T>
__device__ inline T mask_value(int64_t seed, int64_t m, int64_t h, int64_t x, const Geometry& g) {
  const uint32_t key = rise::mask_key(seed, m);
  const Taps ty = rise::taps(h + rise::shift_y(key, g), g.gh, g.up_h);
  const Taps tx = rise::taps(x + rise::shift_x(key, g), g.gw, g.up_w);
  const int64_t gw = g.gw, threshold = g.threshold;
  auto on = [key, gw, threshold](int64_t r, int64_t c) { return rise::cell_on(key, r * gw + c, threshold); };
  return static_cast<T>(static_cast<at::opmath_type<T>>(rise::value(rise::numerator(ty, tx, on), g)));
}

// One thread per pixel of one mask: the mask value is computed once and applied to the N*C
// planes of that pixel.
template <typename scalar_t>
__global__ void rise_mask_kernel(const scalar_t* __restrict__ images, scalar_t* __restrict__ out,
                                 int64_t total, int64_t N, int64_t C, int64_t H, int64_t W,
                                 int64_t seed, int64_t first, int64_t count, Geometry g) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t plane = H * W;
  CNNVIZ_GRID_STRIDE_LOOP(idx, total) {  // idx over count * H * W
    const int64_t pixel = idx % plane;
    const int64_t k = idx / plane;
    const opmath_t m = static_cast<opmath_t>(mask_value<scalar_t>(seed, first + k, pixel / W, pixel % W, g));
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t src = (n * C + c) * plane + pixel;
        const int64_t dst = ((n * count + k) * C + c) * plane + pixel;
        out[dst] = static_cast<scalar_t>(static_cast<opmath_t>(images[src]) * m);
      }
    }
  }
}

template <typename T>
__global__ void fill_masks_kernel(T* __restrict__ out, int64_t total, int64_t H, int64_t W,
                                  int64_t seed, int64_t first, Geometry g) {
  const int64_t plane = H * W;
  CNNVIZ_GRID_STRIDE_LOOP(idx, total) {
    const int64_t pixel = idx % plane;
    out[idx] = mask_value<T>(seed, first + idx / plane, pixel / W, pixel % W, g);
  }
}

at::Tensor rise_mask_cuda(const at::Tensor& images, int64_t seed, at::IntArrayRef grid, double p,
                          int64_t first, int64_t count) {
  TORCH_CHECK(images.is_cuda(), "images must be a CUDA tensor, got ", images.device());
  check_images(images);
  const at::cuda::CUDAGuard device_guard(images.device());
  const int64_t N = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const Geometry g = rise::check_geometry(H, W, grid, p, first, count);
  auto out = at::empty({N, count, C, H, W}, images.options());
  if (out.numel() == 0) {
    return out;
  }
  const auto img = images.contiguous();
  const int64_t total = count * H * W;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, images.scalar_type(), "rise_mask_cuda", [&] {
        rise_mask_kernel<scalar_t><<<cuda::blocks_for(total), cuda::kThreads, 0, stream>>>(
            img.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, N, C, H, W,
            seed, first, count, g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

// Masks per chunk of rise_accumulate (chunk x H x W opmath values live at once).
constexpr int64_t kAccumulateChunk = 256;

at::Tensor rise_accumulate_cuda(const at::Tensor& scores, int64_t H, int64_t W, int64_t seed,
                                at::IntArrayRef grid, double p, int64_t first) {
  TORCH_CHECK(scores.is_cuda(), "scores must be a CUDA tensor, got ", scores.device());
  TORCH_CHECK(scores.dim() == 2, "scores must be a 2-D tensor [N, count], got ", scores.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()), "scores must be a floating-point tensor, got ",
              scores.scalar_type());
  const at::cuda::CUDAGuard device_guard(scores.device());
  const int64_t N = scores.size(0), count = scores.size(1);
  const Geometry g = rise::check_geometry(H, W, grid, p, first, count);
  const auto acc_type = at::toOpMathType(scores.scalar_type());
  auto acc = at::zeros({N, H * W}, scores.options().dtype(acc_type));
  if (N == 0 || count == 0) {
    return acc.view({N, H, W}).to(scores.scalar_type());
  }
  const auto s = scores.to(acc_type).contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc_type, "rise_accumulate_cuda", [&] {
    for (int64_t k0 = 0; k0 < count; k0 += kAccumulateChunk) {
      const int64_t k1 = std::min(count, k0 + kAccumulateChunk);
      auto masks = at::empty({k1 - k0, H * W}, acc.options());
      const int64_t total = masks.numel();
      fill_masks_kernel<scalar_t><<<cuda::blocks_for(total), cuda::kThreads, 0, stream>>>(
          masks.mutable_data_ptr<scalar_t>(), total, H, W, seed, first + k0, g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      acc.addmm_(s.narrow(1, k0, k1 - k0), masks);
    }
  });
  return acc.view({N, H, W}).to(scores.scalar_type());
}

} // namespace

TORCH_LIBRARY_IMPL(cnnviz, CUDA, m) {
  m.impl("rise_mask", &rise_mask_cuda);
  m.impl("rise_accumulate", &rise_accumulate_cuda);
}

} // namespace ops
} // namespace cnnviz

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/progressive_mask_host.h"
#include "../common/progressive_mask_math.h"
#include "cuda_utils.cuh"

namespace cnnviz {
namespace ops {

namespace {

using progressive::Grid;

// One thread per output element of [N, K, C, H, W].
template <typename scalar_t>
__global__ void progressive_mask_kernel(
    const scalar_t* __restrict__ images, const int64_t* __restrict__ ranks,
    const scalar_t* __restrict__ baseline, bool baseline_full,
    const int64_t* __restrict__ counts, bool insertion, scalar_t* __restrict__ out,
    int64_t total, int64_t K, int64_t C, int64_t H, int64_t W, Grid g) {
  const int64_t R = g.rows * g.cols;
  CNNVIZ_GRID_STRIDE_LOOP(idx, total) {
    const int64_t x = idx % W;
    int64_t t = idx / W;
    const int64_t h = t % H;
    t /= H;
    const int64_t c = t % C;
    t /= C;
    const int64_t k = t % K;
    const int64_t n = t / K;
    const int64_t rank = ranks[n * R + progressive::cell(h, x, g.ph, g.pw, g.cols)];
    const int64_t src = ((n * C + c) * H + h) * W + x;
    out[idx] = progressive::select(
        progressive::shows_baseline(rank, counts[k], insertion), images[src],
        baseline_full ? baseline[src] : baseline[0]);
  }
}

at::Tensor progressive_mask_cuda(
    const at::Tensor& images, const at::Tensor& ranks, const at::Tensor& baseline,
    at::IntArrayRef counts, at::IntArrayRef patch, bool insertion) {
  TORCH_CHECK(images.is_cuda(), "images must be a CUDA tensor, got ", images.device());
  const Grid g = progressive::check_progressive_args(images, ranks, baseline, counts, patch);
  const at::cuda::CUDAGuard device_guard(images.device());
  const int64_t N = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t K = static_cast<int64_t>(counts.size());
  auto out = at::empty({N, K, C, H, W}, images.options());
  if (out.numel() == 0) {
    return out;
  }
  const auto img = images.contiguous();
  const auto rk = ranks.contiguous();
  const auto base = baseline.contiguous();
  const bool baseline_full = base.numel() != 1;
  // the K step counts, copied to the device (a few hundred bytes)
  const auto steps = at::tensor(counts, at::TensorOptions().dtype(at::kLong)).to(images.device());
  const int64_t total = out.numel();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, images.scalar_type(),
      "progressive_mask_cuda", [&] {
        progressive_mask_kernel<scalar_t><<<cuda::blocks_for(total), cuda::kThreads, 0, stream>>>(
            img.const_data_ptr<scalar_t>(), rk.const_data_ptr<int64_t>(),
            base.const_data_ptr<scalar_t>(), baseline_full, steps.const_data_ptr<int64_t>(),
            insertion, out.mutable_data_ptr<scalar_t>(), total, K, C, H, W, g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(cnnviz, CUDA, m) {
  m.impl("progressive_mask", &progressive_mask_cuda);
}

} // namespace ops
} // namespace cnnviz

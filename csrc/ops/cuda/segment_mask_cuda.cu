#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "../common/segment_mask_host.h"
#include "../common/segment_mask_math.h"
#include "cuda_utils.cuh"

namespace cnnviz {
namespace ops {

namespace {

// One thread per output element of [R, C, H, W], walking the output's storage order
// (NCHW, or NHWC when kChannelsLast) so that stores coalesce.
template <typename scalar_t, bool kChannelsLast>
__global__ void segment_mask_kernel(
    const scalar_t* __restrict__ images, const int64_t* __restrict__ segments,
    const bool* __restrict__ keep, const int64_t* __restrict__ rows,
    const scalar_t* __restrict__ baseline, bool baseline_full, scalar_t* __restrict__ out,
    int64_t total, int64_t N, int64_t K, int64_t C, int64_t H, int64_t W) {
  CNNVIZ_GRID_STRIDE_LOOP(idx, total) {
    int64_t t = idx, c, x, y;
    if (kChannelsLast) {
      c = t % C;
      t /= C;
      x = t % W;
      t /= W;
      y = t % H;
    } else {
      x = t % W;
      t /= W;
      y = t % H;
      t /= H;
      c = t % C;
    }
    const int64_t r = kChannelsLast ? t / H : t / C;
    const int64_t n = rows[r];
    CUDA_KERNEL_ASSERT(n >= 0 && n < N);
    const bool kept = segment::keeps(keep + r * K, K, segments[(n * H + y) * W + x]);
    const int64_t src = segment::offset(n, c, y, x, C, H, W, kChannelsLast);
    out[idx] = segment::select(kept, images[src], baseline_full ? baseline[src] : baseline[0]);
  }
}

at::Tensor segment_mask_cuda(
    const at::Tensor& images, const at::Tensor& segments, const at::Tensor& keep,
    const at::Tensor& rows, const at::Tensor& baseline) {
  TORCH_CHECK(images.is_cuda(), "images must be a CUDA tensor, got ", images.device());
  segment::check_segment_mask_args(images, segments, keep, rows, baseline);
  const at::cuda::CUDAGuard device_guard(images.device());
  const int64_t N = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t R = keep.size(0), K = keep.size(1);
  const bool channels_last = segment::is_channels_last(images);
  const auto format = segment::layout_of(channels_last);
  auto out = at::empty({R, C, H, W}, images.options().memory_format(format));
  if (out.numel() == 0) {
    return out;
  }
  const auto img = images.contiguous(format);
  const auto seg = segments.contiguous();
  const auto kp = keep.contiguous();
  const auto rw = rows.contiguous();
  const bool full = baseline.numel() != 1;
  const auto base = full ? baseline.contiguous(format) : baseline.contiguous();
  const int64_t total = out.numel();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, images.scalar_type(), "segment_mask_cuda", [&] {
        const auto kernel = channels_last ? &segment_mask_kernel<scalar_t, true>
                                          : &segment_mask_kernel<scalar_t, false>;
        kernel<<<cuda::blocks_for(total), cuda::kThreads, 0, stream>>>(
            img.const_data_ptr<scalar_t>(), seg.const_data_ptr<int64_t>(), kp.const_data_ptr<bool>(),
            rw.const_data_ptr<int64_t>(), base.const_data_ptr<scalar_t>(), full,
            out.mutable_data_ptr<scalar_t>(), total, N, K, C, H, W);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(cnnviz, CUDA, m) {
  m.impl("segment_mask", &segment_mask_cuda);
}

} // namespace ops
} // namespace cnnviz

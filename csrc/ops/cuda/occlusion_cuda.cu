#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/occlusion_host.h"
#include "../common/occlusion_math.h"
#include "cuda_utils.cuh"

namespace cnnviz {
namespace ops {

namespace {

using occlusion::Geometry;
using occlusion::Window;

// Packs per thread that decide how many threads share an output row (see lane_bits_for).
constexpr int64_t kPacksPerThread = 2;

// 2^lane_bits threads per output row of [N, count, C, H, W]: each decodes its row and the
// window once (a few integer divisions), then copies packs lane, lane + lanes, ... of the row
// (V elements each: 128-bit loads and stores when V > 1).
template <typename scalar_t, int V>
__global__ void occlude_kernel(
    const scalar_t* __restrict__ images, const scalar_t* __restrict__ baseline,
    bool baseline_full, scalar_t* __restrict__ out, int64_t rows, int lane_bits, int64_t count,
    int64_t C, int64_t H, int64_t W, int64_t first, Geometry g) {
  const int64_t lanes = int64_t(1) << lane_bits;
  const int64_t packs = W / V;
  const scalar_t b0 = baseline[0];
  CNNVIZ_GRID_STRIDE_LOOP(slot, rows << lane_bits) {
    const int64_t row = slot >> lane_bits;
    const occlusion::OutputRow r = occlusion::output_row(row, C, H, count);
    const Window win =
        occlusion::window_bounds(first + r.k, g.cols, g.kh, g.kw, g.sh, g.sw, H, W);
    const int64_t src_off = (r.n * C * H + r.ch) * W;
    occlusion::occlude_row<V>(
        win, occlusion::row_inside(win, r.h), images + src_off,
        baseline_full ? baseline + src_off : nullptr, b0, out + row * W, slot & (lanes - 1),
        packs, lanes);
  }
}

// Threads per row: enough for kPacksPerThread packs each, at most a warp (32).
int lane_bits_for(int64_t packs) {
  int bits = 0;
  while (bits < 5 && (kPacksPerThread << bits) < packs) {
    ++bits;
  }
  return bits;
}

bool aligned_16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename scalar_t, int V>
void launch_occlude(
    const scalar_t* images, const scalar_t* baseline, bool baseline_full, scalar_t* out,
    int64_t rows, int64_t count, int64_t C, int64_t H, int64_t W, int64_t first,
    const Geometry& g, cudaStream_t stream) {
  const int lane_bits = lane_bits_for(W / V);
  occlude_kernel<scalar_t, V>
      <<<cuda::blocks_for(rows << lane_bits), cuda::kThreads, 0, stream>>>(
          images, baseline, baseline_full, out, rows, lane_bits, count, C, H, W, first, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Difference array: 4 corner updates per (image, window).
template <typename scalar_t, typename acc_t>
__global__ void scatter_corners_kernel(
    const scalar_t* __restrict__ deltas, acc_t* __restrict__ diff, int64_t N, int64_t P,
    int64_t H, int64_t W, Geometry g) {
  const int64_t W1 = W + 1;
  CNNVIZ_GRID_STRIDE_LOOP(idx, N * P) {
    const int64_t n = idx / P, p = idx % P;
    const Window win = occlusion::window_bounds(p, g.cols, g.kh, g.kw, g.sh, g.sw, H, W);
    const acc_t v = static_cast<acc_t>(deltas[idx]);
    acc_t* d = diff + n * (H + 1) * W1;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      int64_t i;
      const int sign = occlusion::corner(win, W1, k, &i);
      atomicAdd(d + i, sign > 0 ? v : -v);
    }
  }
}

// Prefix sum along each of the first H rows (first W columns).
template <typename acc_t>
__global__ void row_scan_kernel(acc_t* __restrict__ diff, int64_t N, int64_t H, int64_t W) {
  const int64_t W1 = W + 1;
  CNNVIZ_GRID_STRIDE_LOOP(idx, N * H) {
    const int64_t n = idx / H, h = idx % H;
    acc_t* row = diff + n * (H + 1) * W1 + h * W1;
    acc_t run = 0;
    for (int64_t x = 0; x < W; ++x) {
      run += row[x];
      row[x] = run;
    }
  }
}

// Prefix sum down each column, times 1 / cover count, written to out.
template <typename scalar_t, typename acc_t>
__global__ void column_scan_kernel(
    const acc_t* __restrict__ diff, scalar_t* __restrict__ out, int64_t N, int64_t H,
    int64_t W, Geometry g) {
  const int64_t W1 = W + 1;
  CNNVIZ_GRID_STRIDE_LOOP(idx, N * W) {
    const int64_t n = idx / W, x = idx % W;
    const acc_t* col = diff + n * (H + 1) * W1 + x;
    scalar_t* o = out + n * H * W + x;
    const acc_t inv_col =
        occlusion::inverse_count<acc_t>(occlusion::cover_count_1d(x, g.kw, g.sw, g.cols));
    acc_t run = 0;
    for (int64_t h = 0; h < H; ++h) {
      run += col[h * W1];
      const acc_t inv_row =
          occlusion::inverse_count<acc_t>(occlusion::cover_count_1d(h, g.kh, g.sh, g.rows));
      o[h * W] = static_cast<scalar_t>(run * (inv_row * inv_col));
    }
  }
}

at::Tensor occlude_cuda(
    const at::Tensor& images, at::IntArrayRef window, at::IntArrayRef stride,
    const at::Tensor& baseline, int64_t first, int64_t count) {
  cnnviz::check_images(images);
  TORCH_CHECK(images.is_cuda(), "images must be a CUDA tensor, got ", images.device());
  const int64_t N = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const Geometry g = occlusion::check_geometry(window, stride, H, W);
  occlusion::check_occlude_args(images, baseline, first, count, g);
  const at::cuda::CUDAGuard device_guard(images.device());
  auto out = at::empty({N, count, C, H, W}, images.options());
  if (out.numel() == 0) {
    return out;
  }
  const auto img = images.contiguous();
  const auto base = baseline.contiguous();
  const bool baseline_full = base.numel() != 1;
  const int64_t rows = out.numel() / W;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, images.scalar_type(), "occlude_cuda", [&] {
        constexpr int kVec = 16 / sizeof(scalar_t);
        const scalar_t* img_ptr = img.const_data_ptr<scalar_t>();
        const scalar_t* base_ptr = base.const_data_ptr<scalar_t>();
        scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
        // 128-bit packs need every row to start on 16 bytes: W a multiple of the pack and
        // aligned buffers (a view with a storage offset may not be)
        const bool packed = W % kVec == 0 && aligned_16(img_ptr) && aligned_16(out_ptr) &&
            (!baseline_full || aligned_16(base_ptr));
        if (packed) {
          launch_occlude<scalar_t, kVec>(
              img_ptr, base_ptr, baseline_full, out_ptr, rows, count, C, H, W, first, g, stream);
        } else {
          launch_occlude<scalar_t, 1>(
              img_ptr, base_ptr, baseline_full, out_ptr, rows, count, C, H, W, first, g, stream);
        }
      });
  return out;
}

at::Tensor occlusion_accumulate_cuda(
    const at::Tensor& deltas, int64_t H, int64_t W, at::IntArrayRef window,
    at::IntArrayRef stride) {
  TORCH_CHECK(deltas.is_cuda(), "deltas must be a CUDA tensor, got ", deltas.device());
  const Geometry g = occlusion::check_geometry(window, stride, H, W);
  occlusion::check_deltas(deltas, H, W, g);
  const at::cuda::CUDAGuard device_guard(deltas.device());
  const int64_t N = deltas.size(0), P = deltas.size(1);
  auto out = at::empty({N, H, W}, deltas.options());
  if (N == 0) {
    return out;
  }
  const auto d = deltas.contiguous();
  const auto acc_dtype = at::toOpMathType(deltas.scalar_type());
  auto diff = at::zeros({N, (H + 1) * (W + 1)}, deltas.options().dtype(acc_dtype));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, deltas.scalar_type(),
      "occlusion_accumulate_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        acc_t* diff_ptr = diff.mutable_data_ptr<acc_t>();
        scatter_corners_kernel<scalar_t, acc_t>
            <<<cuda::blocks_for(N * P), cuda::kThreads, 0, stream>>>(
                d.const_data_ptr<scalar_t>(), diff_ptr, N, P, H, W, g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        row_scan_kernel<acc_t><<<cuda::blocks_for(N * H), cuda::kThreads, 0, stream>>>(
            diff_ptr, N, H, W);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        column_scan_kernel<scalar_t, acc_t>
            <<<cuda::blocks_for(N * W), cuda::kThreads, 0, stream>>>(
                diff_ptr, out.mutable_data_ptr<scalar_t>(), N, H, W, g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(cnnviz, CUDA, m) {
  m.impl("occlude", &occlude_cuda);
  m.impl("occlusion_accumulate", &occlusion_accumulate_cuda);
}

} // namespace ops
} // namespace cnnviz

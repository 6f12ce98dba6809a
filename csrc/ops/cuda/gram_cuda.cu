#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include "../common/gram_host.h"
#include "../common/gram_math.h"
#include "cuda_utils.cuh"

// aten::bmm.dtype (half/bf16 inputs, float32 output) is in torch >= 2.8.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define CNNVIZ_HAS_BMM_OUT_DTYPE 1
#else
#define CNNVIZ_HAS_BMM_OUT_DTYPE 0
#endif

namespace cnnviz {
namespace ops {

namespace {

// The features as the forward GEMM reads them: half/bf16 stay 16-bit where the GEMM takes
// them directly (tensor cores, float32 accumulation and output). With an up-cast float32 copy,
// gram of [8, 512, 3136] half ran at 0.09x the speed of torch.bmm in half on an H200
// (benchmarks/results/ops-cuda-*-nvidia-h200.md).
gram::Features gemm_features(const at::Tensor& features) {
  return gram::prepare_features(features, /*keep_16bit=*/CNNVIZ_HAS_BMM_OUT_DTYPE != 0);
}

// R = F F^T in the opmath dtype, as one cuBLAS GEMM: the recursive halving of gram_host.cpp
// saves multiply-adds and pays on CPUs, but on an H200 it ran at 0.58x the speed of one
// torch.bmm ([8, 512, 3136] float32, benchmarks/results/ops-cuda-*-nvidia-h200.md). Products
// of two half/bf16 values are exact in float32, so from 16-bit F with float32 accumulation R
// is as accurate as from an up-cast copy.
at::Tensor raw_product(const at::Tensor& f) {
  const auto ft = f.transpose(1, 2);
#if CNNVIZ_HAS_BMM_OUT_DTYPE
  const auto acc = at::toOpMathType(f.scalar_type());
  if (f.scalar_type() != acc) {
    return at::bmm(f, ft, acc);
  }
#endif
  return at::bmm(f, ft);
}


// out[n, i, j] = R_sym[n, i, j] / S, cast to the features' dtype.
template <typename scalar_t, typename acc_t>
__global__ void finalize_gram_kernel(
    const acc_t* __restrict__ R, scalar_t* __restrict__ out, int64_t N, int64_t C,
    acc_t inv_s) {
  CNNVIZ_GRID_STRIDE_LOOP(idx, N * C * C) {
    const int64_t j = idx % C;
    const int64_t i = (idx / C) % C;
    const int64_t n = idx / (C * C);
    const acc_t r = gram::symmetric_entry(R + n * C * C, C, i, j);
    out[idx] = static_cast<scalar_t>(r * inv_s);
  }
}

// D = R_sym / S - T; sum(D^2) accumulated into *sumsq (block reduction + one atomic).
template <typename acc_t>
__global__ void loss_diff_kernel(
    const acc_t* __restrict__ R, const acc_t* __restrict__ T, bool target_batched,
    acc_t* __restrict__ D, acc_t* __restrict__ sumsq, int64_t N, int64_t C, acc_t inv_s) {
  __shared__ acc_t partial[cuda::kThreads];
  acc_t local = 0;
  CNNVIZ_GRID_STRIDE_LOOP(idx, N * C * C) {
    const int64_t j = idx % C;
    const int64_t i = (idx / C) % C;
    const int64_t n = idx / (C * C);
    const acc_t r = gram::symmetric_entry(R + n * C * C, C, i, j);
    const acc_t t = T[target_batched ? idx : i * C + j];
    const acc_t d = gram::loss_diff(r, inv_s, t);
    D[idx] = d;
    local += gram::square(d);
  }
  partial[threadIdx.x] = local;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      partial[threadIdx.x] += partial[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    atomicAdd(sumsq, partial[0]);
  }
}

// M = coef * (D + D^T), coef = grad_loss * scale (grad_loss read on the device: no sync).
template <typename acc_t>
__global__ void backward_matrix_kernel(
    const acc_t* __restrict__ D, const acc_t* __restrict__ grad_loss, acc_t* __restrict__ M,
    int64_t N, int64_t C, acc_t scale) {
  const acc_t coef = grad_loss[0] * scale;
  CNNVIZ_GRID_STRIDE_LOOP(idx, N * C * C) {
    const int64_t j = idx % C;
    const int64_t i = (idx / C) % C;
    const int64_t n = idx / (C * C);
    const acc_t* Dn = D + n * C * C;
    M[idx] = gram::backward_entry(Dn[i * C + j], Dn[j * C + i], coef);
  }
}

at::Tensor gram_cuda(const at::Tensor& features) {
  TORCH_CHECK(features.is_cuda(), "features must be a CUDA tensor, got ", features.device());
  const at::cuda::CUDAGuard device_guard(features.device());
  const auto F = gemm_features(features);
  auto out = at::empty({F.N, F.C, F.C}, features.options());
  const int64_t total = out.numel();
  if (total == 0) {
    return out;
  }
  const auto R = raw_product(F.f);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, features.scalar_type(), "gram_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        finalize_gram_kernel<scalar_t, acc_t>
            <<<cuda::blocks_for(total), cuda::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                R.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), F.N, F.C,
                acc_t(1) / static_cast<acc_t>(F.S));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gram_loss_cuda(
    const at::Tensor& features, const at::Tensor& target_gram, double weight) {
  TORCH_CHECK(features.is_cuda(), "features must be a CUDA tensor, got ", features.device());
  const at::cuda::CUDAGuard device_guard(features.device());
  const auto F = gemm_features(features);
  const auto T = gram::prepare_target(target_gram, features, F.N, F.C);
  const auto acc_dtype = at::toOpMathType(features.scalar_type());
  auto diff = at::empty({F.N, F.C, F.C}, features.options().dtype(acc_dtype));
  const int64_t total = diff.numel();
  if (total == 0) {
    return {at::zeros({}, features.options()), diff};
  }
  const auto R = raw_product(F.f);
  auto sumsq = at::zeros({}, diff.options());
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "gram_loss_cuda", [&] {
    loss_diff_kernel<scalar_t>
        <<<cuda::blocks_for(total), cuda::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            R.const_data_ptr<scalar_t>(), T.const_data_ptr<scalar_t>(), T.dim() == 3,
            diff.mutable_data_ptr<scalar_t>(), sumsq.mutable_data_ptr<scalar_t>(), F.N, F.C,
            scalar_t(1) / static_cast<scalar_t>(F.S));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const double scale = weight / static_cast<double>(F.N * F.C * F.C);
  auto loss = sumsq.mul(scale).to(features.scalar_type());
  return {loss, diff};
}

at::Tensor gram_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& features, const at::Tensor& diff,
    double weight) {
  TORCH_CHECK(features.is_cuda(), "features must be a CUDA tensor, got ", features.device());
  TORCH_CHECK(
      grad_loss.numel() == 1, "grad_loss must have one element, got shape ", grad_loss.sizes());
  TORCH_CHECK(
      grad_loss.device() == features.device(), "grad_loss must be on the features' device ",
      features.device(), ", got ", grad_loss.device());
  TORCH_CHECK(
      diff.device() == features.device(), "diff must be on the features' device ",
      features.device(), ", got ", diff.device());
  const at::cuda::CUDAGuard device_guard(features.device());
  const auto F = gram::prepare_features(features);
  const auto acc_dtype = at::toOpMathType(features.scalar_type());
  TORCH_CHECK(
      diff.dim() == 3 && diff.size(0) == F.N && diff.size(1) == F.C && diff.size(2) == F.C,
      "diff must have shape [N, C, C] = [", F.N, ", ", F.C, ", ", F.C, "], got ", diff.sizes());
  TORCH_CHECK(
      diff.scalar_type() == acc_dtype, "diff must have dtype ", acc_dtype, ", got ",
      diff.scalar_type());
  if (F.N == 0 || F.C == 0) {
    return at::zeros_like(features, at::MemoryFormat::Contiguous);
  }
  const auto D = diff.contiguous();
  const auto g = grad_loss.reshape({1}).to(acc_dtype).contiguous();
  auto M = at::empty_like(D);
  const double scale =
      2.0 * weight / (static_cast<double>(F.N * F.C * F.C) * static_cast<double>(F.S));
  const int64_t total = D.numel();
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "gram_loss_backward_cuda", [&] {
    backward_matrix_kernel<scalar_t>
        <<<cuda::blocks_for(total), cuda::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            D.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
            M.mutable_data_ptr<scalar_t>(), F.N, F.C, static_cast<scalar_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // the one GEMM of the backward: dF = M F
  auto grad = at::bmm(M, F.f);
  return grad.to(features.scalar_type()).reshape(features.sizes());
}

} // namespace

TORCH_LIBRARY_IMPL(cnnviz, CUDA, m) {
  m.impl("gram", &gram_cuda);
  m.impl("gram_loss", &gram_loss_cuda);
  m.impl("_gram_loss_backward", &gram_loss_backward_cuda);
}

} // namespace ops
} // namespace cnnviz

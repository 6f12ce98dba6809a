#include <optional>
#include <string_view>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/guided_relu_host.h"
#include "../common/guided_relu_math.h"
#include "cuda_utils.cuh"

namespace cnnviz {
namespace ops {

namespace {

using guided_relu::Mode;

template <bool Bounded, typename scalar_t>
__global__ void forward_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ out, scalar_t upper, int64_t numel) {
  CNNVIZ_GRID_STRIDE_LOOP(i, numel) {
    out[i] = Bounded ? guided_relu::forward(x[i], upper) : guided_relu::forward(x[i]);
  }
}

template <Mode M, bool Bounded, typename scalar_t>
__global__ void backward_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out, scalar_t upper,
    scalar_t* __restrict__ grad_in, int64_t numel) {
  CNNVIZ_GRID_STRIDE_LOOP(i, numel) {
    grad_in[i] = guided_relu::backward<M, Bounded>(grad[i], out[i], upper);
  }
}

template <bool Bounded, typename scalar_t>
void launch_forward(const scalar_t* x, scalar_t* out, scalar_t upper, int64_t numel) {
  forward_kernel<Bounded, scalar_t>
      <<<cuda::blocks_for(numel), cuda::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          x, out, upper, numel);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <Mode M, typename scalar_t>
void launch_backward(
    bool bounded, const scalar_t* g, const scalar_t* o, scalar_t upper, scalar_t* gi,
    int64_t numel) {
  if (bounded) {
    backward_kernel<M, true, scalar_t>
        <<<cuda::blocks_for(numel), cuda::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            g, o, upper, gi, numel);
  } else {
    backward_kernel<M, false, scalar_t>
        <<<cuda::blocks_for(numel), cuda::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            g, o, upper, gi, numel);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor guided_relu_cuda(
    const at::Tensor& x, c10::string_view mode, std::optional<double> upper) {
  guided_relu::parse_mode(std::string_view(mode.data(), mode.size()));
  const bool bounded = guided_relu::parse_upper(upper);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(
      at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got ",
      x.scalar_type());
  const at::cuda::CUDAGuard device_guard(x.device());
  const auto x_ = guided_relu::dense_layout(x);
  auto out = at::empty_like(x_);
  const int64_t numel = out.numel();
  if (numel == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "guided_relu_cuda", [&] {
        // the bound in the tensor's dtype (see guided_relu_cpu.cpp)
        const scalar_t u = bounded ? static_cast<scalar_t>(*upper) : scalar_t(0);
        const scalar_t* xp = x_.const_data_ptr<scalar_t>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        if (bounded) {
          launch_forward<true>(xp, op, u, numel);
        } else {
          launch_forward<false>(xp, op, u, numel);
        }
      });
  return out;
}

at::Tensor guided_relu_backward_cuda(
    const at::Tensor& grad, const at::Tensor& out, c10::string_view mode,
    std::optional<double> upper) {
  const Mode m = guided_relu::parse_mode(std::string_view(mode.data(), mode.size()));
  const bool bounded = guided_relu::parse_upper(upper);
  TORCH_CHECK(out.is_cuda(), "out must be a CUDA tensor, got ", out.device());
  guided_relu::check_backward_args(grad, out);
  const at::cuda::CUDAGuard device_guard(out.device());
  const auto out_ = guided_relu::dense_layout(out);
  const auto grad_ = guided_relu::like_layout(grad, out_);
  auto grad_in = at::empty_like(out_);
  const int64_t numel = grad_in.numel();
  if (numel == 0) {
    return grad_in;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, out.scalar_type(),
      "guided_relu_backward_cuda", [&] {
        const scalar_t* g = grad_.const_data_ptr<scalar_t>();
        const scalar_t* o = out_.const_data_ptr<scalar_t>();
        scalar_t* gi = grad_in.mutable_data_ptr<scalar_t>();
        const scalar_t u = bounded ? static_cast<scalar_t>(*upper) : scalar_t(0);
        switch (m) {
          case Mode::Guided:
            launch_backward<Mode::Guided>(bounded, g, o, u, gi, numel);
            break;
          case Mode::Deconvnet:
            launch_backward<Mode::Deconvnet>(bounded, g, o, u, gi, numel);
            break;
          case Mode::Plain:
            launch_backward<Mode::Plain>(bounded, g, o, u, gi, numel);
            break;
        }
      });
  return grad_in;
}

} // namespace

TORCH_LIBRARY_IMPL(cnnviz, CUDA, m) {
  m.impl("guided_relu", &guided_relu_cuda);
  m.impl("_guided_relu_backward", &guided_relu_backward_cuda);
}

} // namespace ops
} // namespace cnnviz

#include <optional>
#include <string_view>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/guided_relu_host.h"
#include "../common/guided_relu_math.h"
#include "cpu_utils.h"

namespace cnnviz {
namespace ops {

namespace {

using guided_relu::Mode;

constexpr int64_t kGrain = 32768;

// The loops are memory-bound but an AVX2 build of them is still ~5-10% faster than the
// baseline x86-64 (SSE2) one: compile both and pick at run time.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define CNNVIZ_AVX2_CLONE 1
#endif

#define CNNVIZ_FORWARD_LOOP                                                  \
  for (int64_t i = begin; i < end; ++i) {                                    \
    out[i] = Bounded ? guided_relu::forward(x[i], upper) : guided_relu::forward(x[i]); \
  }

#define CNNVIZ_BACKWARD_LOOP                                                  \
  for (int64_t i = begin; i < end; ++i) {                                     \
    grad_in[i] = guided_relu::backward<M, Bounded>(grad[i], out[i], upper);   \
  }

template <bool Bounded, typename scalar_t>
void forward_loop(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ out, scalar_t upper, int64_t begin,
    int64_t end) {
  CNNVIZ_FORWARD_LOOP
}

template <Mode M, bool Bounded, typename scalar_t>
void backward_loop(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out, scalar_t upper,
    scalar_t* __restrict__ grad_in, int64_t begin, int64_t end) {
  CNNVIZ_BACKWARD_LOOP
}

#ifdef CNNVIZ_AVX2_CLONE
template <bool Bounded, typename scalar_t>
__attribute__((target("avx2"))) void forward_loop_avx2(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ out, scalar_t upper, int64_t begin,
    int64_t end) {
  CNNVIZ_FORWARD_LOOP
}

template <Mode M, bool Bounded, typename scalar_t>
__attribute__((target("avx2"))) void backward_loop_avx2(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out, scalar_t upper,
    scalar_t* __restrict__ grad_in, int64_t begin, int64_t end) {
  CNNVIZ_BACKWARD_LOOP
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

template <bool Bounded, typename scalar_t>
void forward_kernel(const scalar_t* x, scalar_t* out, scalar_t upper, int64_t numel) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
#ifdef CNNVIZ_AVX2_CLONE
    if (cpu_has_avx2()) {
      forward_loop_avx2<Bounded>(x, out, upper, begin, end);
      return;
    }
#endif
    forward_loop<Bounded>(x, out, upper, begin, end);
  });
}

template <Mode M, bool Bounded, typename scalar_t>
void backward_kernel(
    const scalar_t* grad, const scalar_t* out, scalar_t upper, scalar_t* grad_in, int64_t numel) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
#ifdef CNNVIZ_AVX2_CLONE
    if (cpu_has_avx2()) {
      backward_loop_avx2<M, Bounded>(grad, out, upper, grad_in, begin, end);
      return;
    }
#endif
    backward_loop<M, Bounded>(grad, out, upper, grad_in, begin, end);
  });
}

template <Mode M, typename scalar_t>
void backward_kernel(
    bool bounded, const scalar_t* grad, const scalar_t* out, scalar_t upper, scalar_t* grad_in,
    int64_t numel) {
  if (bounded) {
    backward_kernel<M, true>(grad, out, upper, grad_in, numel);
  } else {
    backward_kernel<M, false>(grad, out, upper, grad_in, numel);
  }
}

#undef CNNVIZ_FORWARD_LOOP
#undef CNNVIZ_BACKWARD_LOOP

at::Tensor guided_relu_cpu(
    const at::Tensor& x, c10::string_view mode, std::optional<double> upper) {
  guided_relu::parse_mode(std::string_view(mode.data(), mode.size()));
  const bool bounded = guided_relu::parse_upper(upper);
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(
      at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got ",
      x.scalar_type());
  const auto x_ = guided_relu::dense_layout(x);
  auto out = at::empty_like(x_);
  if (out.numel() == 0) {
    return out;
  }
  cpu::advise_huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "guided_relu_cpu", [&] {
        // the bound in the tensor's dtype: the forward saturates at exactly this value and
        // the backward compares the saved output with it
        const scalar_t u = bounded ? static_cast<scalar_t>(*upper) : scalar_t(0);
        const scalar_t* xp = x_.const_data_ptr<scalar_t>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        if (bounded) {
          forward_kernel<true>(xp, op, u, x_.numel());
        } else {
          forward_kernel<false>(xp, op, u, x_.numel());
        }
      });
  return out;
}

at::Tensor guided_relu_backward_cpu(
    const at::Tensor& grad, const at::Tensor& out, c10::string_view mode,
    std::optional<double> upper) {
  const Mode m = guided_relu::parse_mode(std::string_view(mode.data(), mode.size()));
  const bool bounded = guided_relu::parse_upper(upper);
  TORCH_CHECK(out.device().is_cpu(), "out must be a CPU tensor, got ", out.device());
  guided_relu::check_backward_args(grad, out);
  const auto out_ = guided_relu::dense_layout(out);
  const auto grad_ = guided_relu::like_layout(grad, out_);
  auto grad_in = at::empty_like(out_);
  if (grad_in.numel() == 0) {
    return grad_in;
  }
  cpu::advise_huge_pages(grad_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, out.scalar_type(),
      "guided_relu_backward_cpu", [&] {
        const scalar_t* g = grad_.const_data_ptr<scalar_t>();
        const scalar_t* o = out_.const_data_ptr<scalar_t>();
        scalar_t* gi = grad_in.mutable_data_ptr<scalar_t>();
        const scalar_t u = bounded ? static_cast<scalar_t>(*upper) : scalar_t(0);
        const int64_t numel = out_.numel();
        switch (m) {
          case Mode::Guided:
            backward_kernel<Mode::Guided>(bounded, g, o, u, gi, numel);
            break;
          case Mode::Deconvnet:
            backward_kernel<Mode::Deconvnet>(bounded, g, o, u, gi, numel);
            break;
          case Mode::Plain:
            backward_kernel<Mode::Plain>(bounded, g, o, u, gi, numel);
            break;
        }
      });
  return grad_in;
}

} // namespace

TORCH_LIBRARY_IMPL(cnnviz, CPU, m) {
  m.impl("guided_relu", &guided_relu_cpu);
  m.impl("_guided_relu_backward", &guided_relu_backward_cpu);
}

} // namespace ops
} // namespace cnnviz

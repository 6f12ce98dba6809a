#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/gram_host.h"
#include "../common/gram_math.h"
#include "cpu_utils.h"

namespace cnnviz {
namespace ops {

namespace {

// Rows of N*C*C outputs per task: C columns each, so a small grain suffices.
constexpr int64_t kRowGrain = 16;

// out[n, i, j] = R[n, min(i,j), max(i,j)] / S, cast to the features' dtype.
template <typename scalar_t, typename acc_t>
void finalize_gram_kernel(
    const acc_t* R, scalar_t* out, int64_t N, int64_t C, acc_t inv_s) {
  at::parallel_for(0, N * C, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / C, i = row % C;
      const acc_t* Rn = R + n * C * C;
      scalar_t* o = out + row * C;
      for (int64_t j = 0; j < i; ++j) {
        o[j] = static_cast<scalar_t>(gram::symmetric_entry(Rn, C, i, j) * inv_s);
      }
      for (int64_t j = i; j < C; ++j) {
        o[j] = static_cast<scalar_t>(Rn[i * C + j] * inv_s);
      }
    }
  });
}

// D = R_sym / S - T (T broadcast over n when 2-D); returns sum(D^2).
template <typename acc_t>
double loss_diff_kernel(
    const acc_t* R, const acc_t* T, bool target_batched, acc_t* D, int64_t N, int64_t C,
    acc_t inv_s) {
  return at::parallel_reduce(
      0, N * C, kRowGrain, 0.0,
      [&](int64_t begin, int64_t end, double partial) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t n = row / C, i = row % C;
          const acc_t* Rn = R + n * C * C;
          const acc_t* t = T + (target_batched ? row : i) * C;
          acc_t* d = D + row * C;
          acc_t sq = 0;
          for (int64_t j = 0; j < i; ++j) {
            d[j] = gram::loss_diff(gram::symmetric_entry(Rn, C, i, j), inv_s, t[j]);
            sq += gram::square(d[j]);
          }
          for (int64_t j = i; j < C; ++j) {
            d[j] = gram::loss_diff(Rn[i * C + j], inv_s, t[j]);
            sq += gram::square(d[j]);
          }
          partial += static_cast<double>(sq);
        }
        return partial;
      },
      std::plus<double>());
}

// M = coef * (D + D^T)
template <typename acc_t>
void backward_matrix_kernel(const acc_t* D, acc_t* M, int64_t N, int64_t C, acc_t coef) {
  at::parallel_for(0, N * C, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / C, i = row % C;
      const acc_t* Dn = D + n * C * C;
      acc_t* m = M + row * C;
      for (int64_t j = 0; j < C; ++j) {
        m[j] = gram::backward_entry(Dn[i * C + j], Dn[j * C + i], coef);
      }
    }
  });
}

at::Tensor gram_cpu(const at::Tensor& features) {
  TORCH_CHECK(
      features.device().is_cpu(), "features must be a CPU tensor, got ", features.device());
  const auto F = gram::prepare_features(features);
  auto out = at::empty({F.N, F.C, F.C}, features.options());
  if (out.numel() == 0) {
    return out;
  }
  const int64_t tile = gram::tile_size(F.C);
  const auto R = gram::symmetric_product(F.f, tile);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, features.scalar_type(), "gram_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        finalize_gram_kernel<scalar_t, acc_t>(
            R.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), F.N, F.C,
            acc_t(1) / static_cast<acc_t>(F.S));
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gram_loss_cpu(
    const at::Tensor& features, const at::Tensor& target_gram, double weight) {
  TORCH_CHECK(
      features.device().is_cpu(), "features must be a CPU tensor, got ", features.device());
  const auto F = gram::prepare_features(features);
  const auto T = gram::prepare_target(target_gram, features, F.N, F.C);
  const auto acc_dtype = at::toOpMathType(features.scalar_type());
  auto diff = at::empty({F.N, F.C, F.C}, features.options().dtype(acc_dtype));
  if (diff.numel() == 0) {
    return {at::zeros({}, features.options()), diff};
  }
  const int64_t tile = gram::tile_size(F.C);
  const auto R = gram::symmetric_product(F.f, tile);
  double sumsq = 0;
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "gram_loss_cpu", [&] {
    sumsq = loss_diff_kernel<scalar_t>(
        R.const_data_ptr<scalar_t>(), T.const_data_ptr<scalar_t>(), T.dim() == 3,
        diff.mutable_data_ptr<scalar_t>(), F.N, F.C,
        scalar_t(1) / static_cast<scalar_t>(F.S));
  });
  const double loss = weight * sumsq / static_cast<double>(F.N * F.C * F.C);
  return {at::scalar_tensor(loss, features.options()), diff};
}

at::Tensor gram_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& features, const at::Tensor& diff,
    double weight) {
  TORCH_CHECK(
      features.device().is_cpu(), "features must be a CPU tensor, got ", features.device());
  TORCH_CHECK(
      grad_loss.numel() == 1, "grad_loss must have one element, got shape ", grad_loss.sizes());
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
  auto M = at::empty_like(D);
  const double g = grad_loss.item<double>();
  const double coef =
      g * 2.0 * weight / (static_cast<double>(F.N * F.C * F.C) * static_cast<double>(F.S));
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "gram_loss_backward_cpu", [&] {
    backward_matrix_kernel<scalar_t>(
        D.const_data_ptr<scalar_t>(), M.mutable_data_ptr<scalar_t>(), F.N, F.C,
        static_cast<scalar_t>(coef));
  });
  // the one GEMM of the backward: dF = M F
  auto grad = at::empty({F.N, F.C, F.S}, F.f.options());
  cpu::advise_huge_pages(grad);
  at::bmm_out(grad, M, F.f);
  return grad.to(features.scalar_type()).reshape(features.sizes());
}

} // namespace

TORCH_LIBRARY_IMPL(cnnviz, CPU, m) {
  m.impl("gram", &gram_cpu);
  m.impl("gram_loss", &gram_loss_cpu);
  m.impl("_gram_loss_backward", &gram_loss_backward_cpu);
}

} // namespace ops
} // namespace cnnviz
